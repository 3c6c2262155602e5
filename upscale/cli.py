"""The `upscale` command line: parse, call the library, report. No model maths here.

`upscale INPUT...` upscales images (the default command, also reachable as `upscale run`); the other
subcommands are `models`, `fetch`, `convert` and `eval`. A file that happens to be named like a subcommand
is reached as `./models`.

Exit codes: 0 every input done; 1 some input failed, or a folder held no image (each failure is one line on
stderr); 2 usage error: something the command line names is wrong before any input is read (unknown model,
wrong scale, bad option, a --weights file that is missing, corrupt or not weights, an unavailable device);
1 as well when the zoo's weights are not there (not fetched yet, offline) or fail to download; 130
interrupted. Every error line starts with `error: `, and control characters in names are escaped so
that a line stays one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import time
from pathlib import Path

import click

from . import __version__, registry
from .imageio import EXTENSIONS, FORMATS, ImageError
from .options import (
    DEFAULT_OVERLAP,
    MIN_TILE,
    PRECISIONS,
    PROTOCOLS,
    EngineOptions,
    OptionError,
)
from .reporter import DEFAULT as REPORT
from .reporter import Reporter, printable

EXIT_CODES = ("Exit codes: 0 all done, 1 some inputs failed (or a folder held no image), 2 usage error, "
              "130 interrupted.")
EXIT_CODES_ONE_JOB = ("Exit codes: 0 done, 1 it failed (a file that cannot be read or written, weights missing "
                      "or not downloaded), 2 usage error, 130 interrupted.")
EXIT_CODES_FETCH = ("Exit codes: 0 every requested scale is in the cache, 1 some could not be fetched (or, with "
                    "--offline, are not cached), 2 usage error, 130 interrupted.")


class Problem(click.ClickException):
    """A one-line error, `error: ...` on stderr, exit code 1 (a failed input)."""

    exit_code = 1

    def show(self, file=None) -> None:
        _err(self.format_message())


class UsageProblem(Problem):
    """A one-line usage error (exit code 2), without click's multi-line usage banner."""

    exit_code = 2


class DefaultCommandGroup(click.Group):
    """A group whose first argument, when it is not a subcommand, goes to the default `run` command; every
    error ends as one `error:` line and an exit code (click's own usage errors included)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
            sys.stdout.flush()
        except click.UsageError as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            _err(e.format_message() + hint)
            sys.exit(2)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            REPORT.status("interrupted")
            sys.exit(130)
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            _closed_stdout()
        sys.exit(code if isinstance(code, int) else 0)


def _closed_stdout() -> None:
    """The reader of stdout went away before everything was written (`| head -c 100`): say so, exit 1,
    and point stdout at /dev/null so that Python's final flush adds no second message."""
    _err("stdout was closed before all the output was written (broken pipe)")
    with_devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(with_devnull, sys.stdout.fileno())
    sys.exit(1)


def _entry(model: str | None, scale: int | None, weights: str | None = None) -> registry.ModelEntry:
    """The registry entry for -m/-s; with only --weights, the model is detected from the file."""
    from .weights import WeightsError, detect, read_safetensors

    try:
        if model is None and weights is not None:
            try:
                entry = detect(read_safetensors(Path(weights)))
            except WeightsError as e:
                raise UsageProblem(str(e)) from None
            if entry is None:
                raise UsageProblem(f"{weights}: cannot tell which model these weights belong to; name the model and "
                                   f"scale ({REMEDY_FLAGS['model']})")
            if scale is not None and scale != entry.scale:
                raise UsageProblem(f"{weights}: holds {entry.label} weights, not x{scale}")
            return entry
        return registry.resolve(model or registry.DEFAULT_MODEL, scale)
    except registry.UnknownModelError as e:
        raise UsageProblem(str(e)) from None


def _options(protocol: str, precision: str, tile: int | None, overlap: int, device: str) -> EngineOptions:
    try:
        return EngineOptions(protocol, precision, tile, overlap, device)
    except OptionError as e:
        raise UsageProblem(f"--{e.option}: {e.problem}") from None


def _load_upscaler(entry, weights, options: EngineOptions, offline=False, report: Reporter = REPORT):
    """The model loaded and warmed up (kernels built, said once) before any image is timed."""
    from .engine import Upscaler
    from .weights import WeightsError

    try:
        upscaler = Upscaler.load(entry, weights, options, offline=offline)
        upscaler.architecture.warm_up(upscaler.model, upscaler.device, report.note)
        return upscaler
    except OptionError as e:
        raise UsageProblem(f"--{e.option}: {e.problem}") from None
    except WeightsError as e:
        # a --weights file that is wrong is a usage error; the zoo's weights missing (not fetched, offline)
        # or failing to download is a failure to run
        raise (UsageProblem if weights is not None else Problem)(_with_remedy(str(e), e.remedy)) from None


# the flags that do what an error's `remedy` names (lower layers speak of the setting, the CLI of its flag)
REMEDY_FLAGS = {"allow_large": "--allow-large", "weights": "--weights FILE", "model": "-m MODEL -s SCALE"}


def _with_remedy(message: str, remedy: str | None) -> str:
    return f"{message} ({REMEDY_FLAGS[remedy]})" if remedy in REMEDY_FLAGS else message


def _err(message: str) -> None:
    REPORT.error(message)


def _warn_about_device(upscaler, report: Reporter = REPORT) -> None:
    """Once per command: what makes this run slower than it could be on this device."""
    if (warning := upscaler.architecture.device_warning(upscaler.model, upscaler.device)) is not None:
        report.warning(warning)
    if upscaler.device.type == "cpu" and upscaler.working_precision not in ("fp32", "tf32"):
        report.warning(f"{upscaler.working_precision} on the CPU is much slower than fp32 (emulated: measured fp16 "
                       "35-700x, bf16 about 3x); "
                       "half precision pays on a GPU")


model_option = click.option("-m", "--model", default=None, metavar="MODEL",
                            help=f"Model variant (default {registry.DEFAULT_MODEL}); see `upscale models`.")
scale_option = click.option("-s", "--scale", type=int, default=None,
                            help=f"Upscaling factor (default {registry.DEFAULT_SCALE} where the model has it).")
weights_option = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                              help="A .safetensors weights file (the model is detected from it if -m is not given).")
device_option = click.option("--device", default="auto", show_default=True,
                             help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N, mps (Apple GPUs: accepted, not yet tested "
                             "by this project).")
tile_option = click.option("--tile", type=int, default=None, metavar="N",
                           help=f"Tile size in LR pixels, at least {MIN_TILE} (default: whole image when it fits the "
                           "memory budget).")
overlap_option = click.option("--overlap", type=int, default=DEFAULT_OVERLAP, show_default=True,
                              help="Blend width across tile seams, LR pixels.")
precision_option = click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
                                show_default=True, help="auto: fp16 on CUDA, fp32 on the CPU. fp32 is IEEE float32 "
                                "everywhere (TF32 off on CUDA); tf32 allows TF32 tensor cores on CUDA (faster, "
                                "about 1e-3 relative error; fp32 elsewhere). Non-finite half-precision tiles are "
                                "recomputed in fp32. Half precision on the CPU is much slower than fp32 (a warning "
                                "says so).")
offline_option = click.option("--offline", is_flag=True, help="Never touch the network (HF_HUB_OFFLINE=1 too).")


@click.group(cls=DefaultCommandGroup, epilog=EXIT_CODES)
@click.version_option(__version__, prog_name="upscale")
def main():
    """Super-resolution upscaler: AGDN, ESC and ASID on your images.

    \b
    upscale photo.jpg                  writes photo_x4.png beside it (AGDN x4)
    upscale photo.jpg -m esc -s 2 -o big.png
    upscale models | fetch | convert | eval | bench
    """


@main.command("run", epilog=EXIT_CODES, short_help="Upscale images (the default command).")
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("-o", "--output", default=None,
              help="Output file (one input), folder, or - for stdout. Default: NAME_x<scale>.png beside each input.")
@click.option("--from-list", "from_list", default=None, metavar="FILE|-",
              help="Read input paths from FILE (or stdin), one per line.")
@click.option("-r", "--recursive", is_flag=True, help="Walk sub-folders of folder inputs, mirroring them under -o.")
@model_option
@scale_option
@weights_option
@device_option
@offline_option
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default=None,
              help="Output format (default: from -o's extension, else png).")
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True, help="JPEG/WebP quality.")
@click.option("--suffix", default=None, help="Output name suffix (default _x<scale>).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (an input is never overwritten).")
@click.option("--skip-existing/--no-skip-existing", "skip_existing", default=None,
              help="Skip inputs whose output exists (default for folder inputs; a named file fails instead).")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="auto",
              show_default=True, help="auto: the official procedure when the whole image fits the memory budget, "
              "else tiled (--tile forces tiles); reference: the family's official test procedure (what the "
              "papers measured; ASID's is its own 64-px tiler); whole: one plain pass over the whole image; "
              "tiled: tiles with local statistics, memory bounded by the tile.")
@tile_option
@overlap_option
@precision_option
@click.option("--allow-large", is_flag=True, help="Accept images above Pillow's decompression-bomb limit.")
@click.option("--dry-run", is_flag=True, help="Print what would be done, touch nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input on stdout, then a summary object.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run the batch on a Ray cluster: local (a private one on this machine), auto (RAY_ADDRESS or "
              "the running `ray start --head`), or HOST:PORT. Inputs and outputs must be on storage every node "
              "shares. Needs the ray extra.")
@click.option("--workers", type=click.IntRange(1), default=None, metavar="N",
              help="With --ray: workers (each loads the model once). Default: one per GPU of the cluster, else "
              "one per node.")
def run(inputs, output, from_list, recursive, model, scale, weights, device, offline, fmt, quality, suffix,
        overwrite, skip_existing, protocol, tile, overlap, precision, allow_large, dry_run, as_json, quiet,
        ray_address, workers):
    """Upscale INPUT images: files, folders, globs, or - for image bytes on stdin."""
    # stdout carries data only: the image (-o -), the plan (--dry-run) or JSON lines (--json: one object per
    # input, folder files that are not images included as "skipped", then a summary object). Everything
    # else goes to stderr: one line per failure naming the file, per-image lines and a summary unless
    # --quiet or --json, a progress bar only when stderr is a terminal. Ctrl-C or SIGTERM once the command
    # runs (reading the list, planning, loading the model, upscaling) ends with a line saying what was done
    # and exit code 130; the image being written when it came leaves no file behind.
    from .batch import STDIO, UpscaleStages, plan_jobs, read_list, run_jobs

    if overwrite and skip_existing:
        raise UsageProblem("--overwrite and --skip-existing contradict each other")
    if as_json and output == "-" and not dry_run:
        raise UsageProblem("--json and -o - both need stdout; write the image to a file or drop --json")
    if workers is not None and ray_address is None:
        raise UsageProblem("--workers is for a Ray cluster: give --ray local, auto or HOST:PORT")
    if ray_address is not None and not dry_run:
        from .cluster import ClusterError, require_ray

        try:
            require_ray()
        except ClusterError as e:
            raise UsageProblem(str(e)) from None
    # on a cluster Ray writes its own messages to sys.stdout: the records keep the real stdout
    report = Reporter(quiet=quiet, as_json=as_json, stdout=sys.stdout if ray_address else None)
    outcomes: list = []
    interrupted = False
    cluster = None  # a --ray run's figures
    bar = contextlib.ExitStack()  # closes the progress bar, however the run ends
    advance = None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM ends a run as Ctrl-C does
    try:
        names = list(inputs)
        if from_list:
            if from_list == "-" and "-" in names:
                raise UsageProblem("stdin cannot hold both the image list and an image")
            label = "<stdin>" if from_list == "-" else from_list
            try:
                names += read_list(from_list, lambda: sys.stdin.read())
            except OSError as e:
                raise UsageProblem(f"{label}: cannot read the list ({e.strerror or e})") from None
            except UnicodeDecodeError:
                raise UsageProblem(f"{label}: the list is not UTF-8 text (one path per line)") from None
        if not names:
            raise UsageProblem("no input given (pass images, folders, globs, - for stdin, or --from-list)")
        if names.count("-") > 1:
            raise UsageProblem("stdin (-) can be given once")
        entry = _entry(model, scale, weights)
        options = _options(protocol, precision, tile, overlap, device)
        ext = EXTENSIONS[FORMATS[fmt]] if fmt else None
        plan = plan_jobs(names, output, entry.scale, suffix=suffix, ext=ext, recursive=recursive)
        if ray_address is not None and (output == "-" or any(STDIO in (job.source, job.dest) for job in plan.jobs)):
            raise UsageProblem("--ray reads and writes files on shared storage: stdin and stdout (-) cannot be used")
        if output == "-" and len(plan.jobs) != 1:
            raise UsageProblem(f"-o - (stdout) takes exactly one input, got {len(plan.jobs)}")
        if output and output != "-" and len(plan.jobs) > 1 and Path(output).is_file():
            raise UsageProblem(f"{output}: with several inputs, -o must be a folder")
        for job in plan.jobs:
            if job.dest != STDIO and not job.make_folder:  # -o names the file: its name says the format
                _check_output_name(job.dest, fmt)
        if dry_run:
            for job in plan.jobs:
                state = "exists" if job.dest != STDIO and job.dest.exists() else "new"
                if job.conflict or job.skip:
                    state = "fails: " + job.conflict if job.conflict else "skipped: " + job.skip
                if as_json:
                    report.record({"input": str(job.source), "output": str(job.dest), "output_state": state})
                else:
                    report.line(f"{job.source} -> {job.dest} ({state})")
            for path in plan.not_images:
                if as_json:
                    report.record({"input": str(path), "status": "skipped", "error": "not an image"})
                else:
                    report.line(f"{path}: not an image, skipped")
            for folder in plan.empty_folders:
                _err(_no_images(folder, recursive))
            if plan.empty_folders:
                sys.exit(1)
            return

        protect = tuple(job.source for job in plan.jobs if job.source != STDIO)
        start = time.perf_counter()
        try:
            if ray_address is None:
                upscaler = _load_upscaler(entry, weights, options, offline, report)
                _warn_about_device(upscaler, report)
                base_record = {"model": entry.name, "scale": entry.scale, "device": str(upscaler.device),
                               "precision": upscaler.working_precision, "protocol": options.protocol, "tile": tile}

                frame_bar: list = []  # a single file's own bar, counting its frames

                def on_frame(job, done, frames):
                    """Progress on files of several frames: the batch's bar names the frame, a single file gets a
                    bar."""
                    if advance is not None:
                        name = "<stdin>" if job.source == STDIO else job.source.name
                        advance(description=f"upscaling {name}: frame {done}/{frames}" if done < frames else "upscaling")
                        return
                    if not frame_bar:
                        frame_bar.append(bar.enter_context(report.progress(f"upscaling {frames} frames", frames)))
                    if frame_bar[0] is not None:
                        frame_bar[0](completed=done)

                stages = UpscaleStages(upscaler, FORMATS[fmt] if fmt else None, quality, overwrite, allow_large,
                                       protect, _provenance(entry, str(upscaler.device)), on_frame)
            else:  # each worker loads the model: its records say their device and precision (none: no worker ran it)
                base_record = {"model": entry.name, "scale": entry.scale, "device": None, "precision": None,
                               "protocol": options.protocol, "tile": tile}

            if len(plan.jobs) > 1:
                advance = bar.enter_context(report.progress("upscaling", len(plan.jobs)))

            def on_outcome(outcome):
                record = {**base_record, **outcome.record()}
                name = "<stdin>" if outcome.job.source == STDIO else str(outcome.job.source)
                if record.get("error"):  # one line, as on stderr, with the flag that would help
                    record["error"] = printable(_with_remedy(record["error"], outcome.remedy))
                if as_json:
                    report.record(record)
                if outcome.status == "failed":
                    message = _with_remedy(outcome.error or "failed", outcome.remedy)
                    if name not in message and str(outcome.job.dest) not in message:
                        message = f"{name}: {message}"  # every failure line names its file
                    report.error(message)
                elif outcome.status == "ok" and output != "-":
                    report.info(f"{outcome.job.source} -> {outcome.job.dest} ({entry.label}, {outcome.seconds:.2f} s)")
                for warning in outcome.extra.get("warnings", ()):
                    report.warning(f"{name}: {warning}")
                if advance is not None:
                    advance(advance=1)

            if as_json:
                for path in plan.not_images:
                    report.record({"input": str(path), "output": None, "status": "skipped",
                                   "error": "not an image", **base_record, "seconds": 0.0})
            for folder in plan.empty_folders:
                if as_json:
                    report.record({"input": str(folder), "output": None, "status": "failed",
                                   "error": printable(_no_images(folder, recursive)), **base_record, "seconds": 0.0})
                report.error(_no_images(folder, recursive))
            if ray_address is None:
                outcomes = run_jobs(plan.jobs, stages, overwrite=overwrite, skip_existing=skip_existing,
                                    on_outcome=on_outcome,
                                    errors=(ImageError, OSError, ValueError, RuntimeError, MemoryError))
            else:
                cluster = _run_on_cluster(plan.jobs, ray_address, workers, entry, weights, options, offline, fmt,
                                          quality, overwrite, skip_existing, allow_large, output, on_outcome, report)
                outcomes, interrupted = cluster.outcomes, cluster.interrupted
        except KeyboardInterrupt as e:  # while loading the model or upscaling: report below
            interrupted, outcomes = True, getattr(e, "outcomes", outcomes)
    except KeyboardInterrupt:  # while reading the list or planning
        report.status("interrupted: nothing done")
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    counts = {k: sum(o.status == k for o in outcomes) for k in ("ok", "skipped", "failed")}
    counts["failed"] += len(plan.empty_folders)  # a folder with nothing to do is a failed input
    summary = {"summary": True, **counts, "not_images": len(plan.not_images),
               "total": len(plan.jobs) + len(plan.empty_folders),
               "not_started": len(plan.jobs) - len(outcomes), "interrupted": interrupted,
               "seconds": round(time.perf_counter() - start, 3)}
    if cluster is not None:  # throughput while the dataset ran (the cluster's start excluded, actors' included)
        seconds = cluster.seconds
        summary.update({"workers": cluster.workers, "cluster_seconds": round(seconds, 3),
                        "images_per_s": round(counts["ok"] / seconds, 3) if seconds else None,
                        "output_mp_per_s": round(cluster.output_pixels / 1e6 / seconds, 3) if seconds else None})
        if cluster.error:
            report.error(cluster.error)
    if as_json:
        report.record(summary)
    if interrupted:
        report.status(f"interrupted: {counts['ok']} done, {counts['skipped']} skipped, {counts['failed']} failed, "
                      f"{summary['not_started']} not started; no partial file left")
        sys.exit(130)
    if len(plan.jobs) > 1 or plan.not_images or plan.empty_folders:
        reasons = sorted({o.error or "" for o in outcomes if o.status == "skipped"})
        why = f" ({'; '.join(reasons)})" if len(reasons) == 1 else ""
        report.info(f"{counts['ok']} upscaled, {counts['skipped']} skipped{why}, {counts['failed']} failed, "
                    f"{len(plan.not_images)} not images")
    if cluster is not None and cluster.seconds:
        report.info(f"{summary['images_per_s']:.2f} images/s, {summary['output_mp_per_s']:.2f} output MP/s on "
                    f"{cluster.workers} Ray worker(s)")
    if cluster is not None and cluster.error:
        sys.exit(1)
    if counts["failed"]:
        sys.exit(1)


def _provenance(entry, device: str | None) -> dict:
    """What each output records of how it was made (beside what the image ran with), in one key order for local
    and Ray runs, so that their outputs are the same bytes; a Ray worker fills in its device."""
    return {"model": entry.name, "variant": entry.title, "scale": entry.scale, "device": device,
            "upscale": __version__}


def _run_on_cluster(jobs, address, workers, entry, weights, options, offline, fmt, quality, overwrite, skip_existing,
                    allow_large, output, on_outcome, report: Reporter):
    """`upscale run --ray`: the same jobs on a Ray cluster (upscale/cluster.py); usage errors exit 2."""
    from .cluster import ClusterError, WorkerSettings, run_on_cluster

    settings = WorkerSettings(entry, os.path.abspath(weights) if weights else None, options, offline,
                              FORMATS[fmt] if fmt else None, quality, overwrite, allow_large,
                              _provenance(entry, None), os.getcwd())
    try:
        return run_on_cluster(jobs, settings, address=address, workers=workers, overwrite=overwrite,
                              skip_existing=skip_existing, output_folder=output, on_outcome=on_outcome,
                              note=report.note)
    except ClusterError as e:
        raise UsageProblem(str(e)) from None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _no_images(folder: Path, recursive: bool) -> str:
    return f"no images found in {folder}" + (" or its sub-folders" if recursive else "")


def _check_output_name(dest: Path, fmt: str | None) -> None:
    """A file named by -o holds the format its extension says: an extension we cannot write, or one that
    disagrees with --format, is a usage error (PNG bytes in `big.gif` helped nobody). With --format, a name
    without a known image extension (`out.img`) is written in that format."""
    from .imageio import format_for

    named = format_for(dest)
    if fmt is None and named is None:
        known = ", ".join(f".{e}" for e in FORMATS)
        what = f"cannot write {dest.suffix} images" if dest.suffix else "has no image extension"
        raise UsageProblem(f"{dest}: {what}; name it with one of {known}, end -o with / for a folder, "
                           "or pass --format")
    if fmt is not None and named is not None and named != format_for(None, fmt):
        raise UsageProblem(f"{dest}: the name says {named} but --format says {format_for(None, fmt)}; "
                           "make them agree")


@main.command(epilog=EXIT_CODES_ONE_JOB, short_help="Convert an official .pth to .safetensors.")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output .safetensors (default: beside the input, same name).")
@click.option("-m", "--model", default=None, metavar="MODEL",
              help="Model variant (default: detected from the checkpoint); see `upscale models`.")
@click.option("-s", "--scale", type=int, default=None,
              help="Upscaling factor (default: detected from the checkpoint).")
@click.option("--key", default=None, help="Checkpoint entry holding the weights (default: the registry's, else auto).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def convert(checkpoint, output, model, scale, key, overwrite):
    """Convert an official .pth CHECKPOINT to .safetensors, checking every key and shape."""
    from .weights import WeightsError, convert_checkpoint

    src = Path(checkpoint)
    if not src.is_file():
        raise Problem(f"{src}: no such file")
    dst = Path(output) if output else src.with_suffix(".safetensors")
    if dst.exists() and not overwrite:
        raise Problem(f"{dst}: already exists (use --overwrite to replace it)")
    entry = None
    if model is not None or scale is not None:
        entry = _entry(model, scale)
    try:
        used = convert_checkpoint(src, dst, entry, key=key)
    except WeightsError as e:  # the checkpoint is convert's input
        raise Problem(_with_remedy(str(e), e.remedy)) from None
    REPORT.info(f"{src} -> {dst} ({used.label})")


@main.command("eval", epilog=EXIT_CODES_ONE_JOB, short_help="PSNR / SSIM on a benchmark folder.")
@model_option
@scale_option
@weights_option
@device_option
@offline_option
@click.option("--hr", "hr_dir", type=click.Path(exists=True, file_okay=False), required=True,
              help="Folder of high-resolution ground-truth images.")
@click.option("--lr", "lr_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of LR images (default: made from HR with MATLAB-style bicubic).")
@click.option("--protocol", type=click.Choice([p for p in PROTOCOLS if p != "auto"]), default=None,
              help="reference (the default): the family's official test procedure (what the papers report); "
              "whole: one plain pass over the whole image; tiled: our tiled engine with local statistics "
              "(--tile implies it).")
@tile_option
@overlap_option
@precision_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_command(model, scale, weights, device, offline, hr_dir, lr_dir, protocol, tile, overlap, precision, as_json):
    """PSNR / SSIM (Y channel, border = scale) of a model on an HR folder."""
    from .evaluation import evaluate

    options = _options(protocol or ("tiled" if tile is not None else "reference"), precision, tile, overlap, device)
    upscaler = _load_upscaler(_entry(model, scale, weights), weights, options, offline)
    _warn_about_device(upscaler)
    try:
        result = evaluate(upscaler, hr_dir, lr_dir)
    except ImageError as e:
        raise Problem(str(e)) from None
    if as_json:
        REPORT.record(result.to_dict())
        return
    from rich.table import Table

    tiles = f" (tile {tile}, overlap {overlap})" if options.protocol == "tiled" else ""
    table = Table(title=f"{upscaler.entry.label}, protocol {options.protocol}{tiles}, LR: {result.lr_source}")
    for col in ("image", "LR size", "PSNR-Y (dB)", "SSIM-Y"):
        table.add_column(col, justify="left" if col == "image" else "right")
    for s in result.images:
        table.add_row(s.name, f"{s.lr_size[0]}x{s.lr_size[1]}", f"{s.psnr:.4f}", f"{s.ssim:.5f}")
    table.add_section()
    table.add_row("mean", "", f"{result.psnr:.4f}", f"{result.ssim:.5f}")
    REPORT.table(table)


@main.command(short_help="What this machine runs: device, kernels, formats.",
              epilog="Exit codes: 0 reported (it changes nothing), 2 usage error.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def doctor(as_json):
    """What `upscale` would use here, without changing anything: versions, devices and the default one with its
    precision, the CPU kernels of AGDN, ESC and ASID (built or not, where cached), the cache folder, and the image formats this
    installation reads and writes."""
    import platform

    import torch

    from .engine import Upscaler, available_devices, pick_device
    from .files import cache_dir
    from .imageio import format_support
    from .models import kernels

    device = pick_device("auto")
    probe = Upscaler(registry.resolve(registry.DEFAULT_MODEL, 4), torch.nn.Identity(), device, precision="auto")
    report = {
        "upscale": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(), "devices": available_devices(), "default_device": str(device),
        "default_precision": probe.working_precision, "cpu_kernels": kernels.describe(), "cache": str(cache_dir()),
        "formats": format_support(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        report["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                         "cuda": torch.version.cuda}
    if as_json:
        REPORT.record(report)
        return
    k = report["cpu_kernels"]
    lines = [
        f"upscale {report['upscale']} (Python {report['python']}, torch {report['torch']}, "
        f"{report['cpu_threads']} CPU threads)",
        f"devices: {', '.join(report['devices'])}; default {report['default_device']} in "
        f"{report['default_precision']}" + (f" ({report['gpu']['name']}, {report['gpu']['memory_gb']} GB)"
                                            if "gpu" in report else ""),
        f"CPU kernels (AGDN, ESC, ASID): {k['state']}" + (f" ({k['capability']})" if k.get("capability") else "")
        + (f"; {k['reason']}" if k.get("reason") else ""),
        *([f"  {k['path']}"] if k.get("path") else []),
        f"cache: {report['cache']}",
        "formats:",
    ]
    for name, f in report["formats"].items():
        can = [what for what in ("read", "write") if f.get(what)]
        extra = (f"; reads {f['deep_read']}" if f.get("deep_read") else "") + \
                (f"; writes {f['deep']}" if f.get("deep") else "; writes 8-bit" if f.get("write") else "")
        lines.append(f"  {name:<5} {' + '.join(can) or 'unavailable'}: {f['via']}{extra}")
    for line in lines:
        REPORT.line(line)


@main.command(short_help="List the models and which weights are here.")
@click.option("--json", "as_json", is_flag=True, help="Print the zoo as JSON lines, one per model and scale.")
def models(as_json):
    """List every model in the zoo, and whether its weights are present."""
    from .weights import candidate_paths

    rows = []
    for e in registry.all_entries():
        present = next((str(p) for p in candidate_paths(e) if p.is_file()), None)
        rows.append({"model": e.name, "family": e.family, "title": e.title, "scale": e.scale, "params": e.params,
                     "license": e.license, "weights": present, "psnr": dict(e.psnr)})
    if as_json:
        for r in rows:
            REPORT.record(r)
        return
    from rich import box
    from rich.table import Table

    # one line per variant at 80 columns: the scales together, the licence as a tag with its note below
    variants: dict[str, list[dict]] = {}
    for r in rows:
        variants.setdefault(r["model"], []).append(r)
    licences: list[str] = []
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, caption_justify="left")
    for col, justify in (("model", "left"), ("scales", "left"), ("params", "right"), ("weights here", "left"),
                         ("x4 PSNR (dB)", "left"), ("licence", "left")):
        table.add_column(col, justify=justify, no_wrap=True)
    missing = False
    for name, scales in variants.items():
        params = sorted(r["params"] for r in scales)
        low, high = _thousands(params[0]), _thousands(params[-1])
        span = low if low == high else f"{low}-{high}"
        present = [f"x{r['scale']}" for r in scales if r["weights"]]
        missing = missing or len(present) < len(scales)
        x4 = next((r["psnr"] for r in scales if r["scale"] == 4 and r["psnr"]), {})
        psnr = next((f"{_short_set(k)} {v:.2f}" for k, v in x4.items()), "")
        licence = scales[0]["license"]
        tag = licence if len(licence) <= 12 else None
        if tag is None:
            if licence not in licences:
                licences.append(licence)
            tag = f"see {'*' * (licences.index(licence) + 1)}"
        table.add_row(name, " ".join(f"x{r['scale']}" for r in scales), span, " ".join(present) or "-", psnr, tag)
    notes = [f"{'*' * (i + 1)} {text}" for i, text in enumerate(licences)]
    if missing:
        notes.append("Weights not here: `upscale fetch MODEL -s N` downloads them (every scale")
        notes.append("without -s), or `upscale convert FILE.pth` converts an official checkpoint.")
    notes.append("`upscale models --json` has every field (PSNR on each benchmark, sources).")
    table.caption = "\n".join(notes)
    REPORT.table(table)


def _thousands(n: int) -> str:
    """280,530 -> 281 K; 12,455,916 -> 12.5 M."""
    return f"{n / 1e6:.1f} M" if n >= 1_000_000 else f"{round(n / 1e3)} K"


def _short_set(name: str) -> str:
    return {"Urban100": "U100", "Manga109": "M109"}.get(name, name)


@main.command(epilog=EXIT_CODES_FETCH, short_help="Download a model's official weights.")
@click.argument("model")
@click.option("-s", "--scale", type=int, default=None, help="Upscaling factor (default: every scale of MODEL).")
@click.option("--force", is_flag=True, help="Download again even when the weights are cached.")
@click.option("--offline", is_flag=True, help="Download nothing: say which scales are in the cache and where "
              "(exit 1 if one is missing).")
def fetch(model, scale, force, offline):
    """Download, verify (sha256) and convert the official weights of MODEL into the cache.

    \b
    UPSCALE_CACHE_DIR     where converted weights are cached
    UPSCALE_MIRROR        fetch https://HOST/PATH from $UPSCALE_MIRROR/HOST/PATH instead
    UPSCALE_DOWNLOAD_TIMEOUT, HF_HUB_OFFLINE=1 (never touch the network)
    """
    from .weights import WeightsError, resolve_weights
    from .weights import fetch as fetch_weights

    if force and offline:
        raise UsageProblem("--force downloads again and --offline downloads nothing: give one of them")
    try:
        entries = [registry.resolve(model, scale)] if scale else [
            registry.resolve(model, s) for s in registry.scales_of(model)]
    except registry.UnknownModelError as e:
        raise UsageProblem(str(e)) from None
    failed = 0
    for entry in entries:
        with REPORT.progress(entry.label, None) as update:
            report = (lambda done, total: update(completed=done, total=total)) if update else None
            try:
                path = (fetch_weights(entry, progress=report, force=True) if force
                        else resolve_weights(entry, progress=report, offline=offline))
            except WeightsError as e:
                failed += 1
                REPORT.error(_with_remedy(str(e), e.remedy))
                continue
        REPORT.info(f"{entry.label}: {path}")
    if failed:
        sys.exit(1)


@main.command(epilog="Exit codes: 0 done, 1 the machine was too busy to time (see --force), 2 usage error.",
              short_help="Time a model: latency, MP/s, peak memory.")
@click.option("-m", "--model", default="agdn", show_default=True, metavar="MODEL", help="Model variant.")
@scale_option
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="A .safetensors weights file.")
@click.option("--random-weights", is_flag=True, help="Time with random weights (no weights file needed).")
@device_option
@offline_option
@click.option("--size", "sizes", multiple=True, default=("128x128",), show_default=True, metavar="HxW",
              help="LR input size of a generated image; repeat for several.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Also time a real image file as `upscale FILE` runs it: the forward pass alone and end to end "
              "(decode, upscale, encode, write), per LR pixel, beside the first --size's forward.")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="auto", show_default=True,
              help="As for run (auto: the whole image when it fits the memory budget, else tiles).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="As for run (auto: fp16 on CUDA, fp32 on the CPU).")
@tile_option
@click.option("--repeats", type=click.IntRange(1), default=5, show_default=True, help="Timed runs per case.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True,
              help="Untimed runs per case first (compile, caches); peak memory is measured over them.")
@click.option("--threads", type=int, default=None, help="Torch threads (default: the number of cores).")
@click.option("--no-reference", is_flag=True, help="Skip the straight reference implementation.")
@click.option("--folder-images", type=click.IntRange(0), default=3, show_default=True,
              help="Images in the end-to-end folder run (decode, infer, encode, write).")
@click.option("--force", is_flag=True, help="Time even when the CPU is already busy (results marked busy).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per case on stdout.")
def bench(model, scale, weights, random_weights, device, offline, sizes, image, protocol, precision, tile, repeats,
          warmup, threads, no_reference, folder_images, force, as_json):
    """Latency, output MP/s and peak memory, median over repeats, beside the straight reference path."""
    from .bench import MachineBusyError, format_table, run_bench

    try:
        parsed = [tuple(int(v) for v in size.lower().split("x")) for size in sizes]
    except ValueError:
        raise UsageProblem(f"--size takes HxW, e.g. 128x128 (got {', '.join(sizes)})") from None
    try:
        results = run_bench(model, scale, sizes=parsed, device=device, precision=precision, tile=tile,
                            image=image, protocol=protocol,
                            repeats=repeats, warmup=warmup, reference_impl=not no_reference, threads=threads,
                            weights="random" if random_weights else weights, offline=offline,
                            folder_images=folder_images, force=force,
                            log=None if as_json else REPORT.info)
    except MachineBusyError as e:
        raise Problem(str(e)) from None
    except OptionError as e:
        raise UsageProblem(f"--{e.option}: {e.problem}") from None
    except ValueError as e:
        raise UsageProblem(str(e)) from None
    if as_json:
        for row in results:
            REPORT.record(row)
        return
    format_table(results, REPORT.console())


if __name__ == "__main__":
    main()
