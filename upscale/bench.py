"""`upscale bench`: latency, throughput and peak memory of a model, its fast path beside its straight path.

`run_bench` times `Upscaler.run` (the call the CLI and the API make) on generated images, after warm-up, and
reports the median and the spread (min, max, quartiles) over the repeats. For models with a fast inference
path (AGDN: `fast=False` at build time) the straight reference implementation is timed in the same run,
interleaved repeat by repeat, so the "speed-up vs straight path" is measured side by side under the same
machine conditions. It also times a folder end to end (decode, infer, encode, write) on a few generated
PNGs through the CLI's batch pipeline, sequential and overlapped (read-ahead and background writes, see
`batch.run_jobs`). Results are JSON-able dicts (one per case and implementation, plus one per folder mode);
`format_table` renders them for people.

Timing is only meaningful on a quiet machine: before anything runs, `run_bench` measures how busy the CPUs
already are (other processes' share of the CPU time over a short window, from /proc/stat; the 1-minute load
average is reported too) and refuses with `MachineBusyError` when that exceeds `busy_threshold`, unless
`force=True`; forced results carry `"busy": true`, as do results after which the CPUs were found busy. Torch threads are pinned for the run (default: the CPUs this process may use)
and restored afterwards.

Memory: `memory.PeakMemory` (on CUDA `torch.cuda.max_memory_allocated`; on the CPU the process's RSS
high-water mark, reset before each case where Linux allows it), over the warm-up call.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

__all__ = ["MachineBusyError", "run_bench", "format_table", "cpu_busy", "parse_size"]


class MachineBusyError(RuntimeError):
    """The CPUs are already busy: timings would measure the other processes, not the model."""


# -- machine state ---------------------------------------------------------------------------------------------

def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def cpu_busy(interval: float = 0.5) -> dict[str, float]:
    """How busy the machine is without us: other processes' CPU share over `interval` seconds (0..1 per
    core, from /proc/stat minus this process's own CPU time) and the 1-minute load average per core."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] / cores if hasattr(os, "getloadavg") else 0.0
    before, own_before = _cpu_jiffies(), time.process_time()
    time.sleep(interval)
    after, own_after = _cpu_jiffies(), time.process_time()
    if before is None or after is None or after[1] == before[1]:
        return {"others": load, "load_per_core": load}
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = (after[0] - before[0]) - (own_after - own_before) * hz
    return {"others": max(0.0, busy / (after[1] - before[1])), "load_per_core": load}


# -- helpers ------------------------------------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
    """"128", "128x96" (height x width) -> (h, w)."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"size {text!r}: expected N or HxW") from None
    if h < 1 or w < 1:
        raise ValueError(f"size {text!r}: sides must be positive")
    return h, w


def _spread(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else (ordered[0],) * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "q1": q1, "q3": q3}


def _synthetic_image(h: int, w: int, seed: int):
    """A deterministic photo-like test image (smooth shading, edges and some texture) as (1, 3, h, w) in [0, 1]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([0.5 + 0.4 * torch.sin(6.3 * xx + p) * torch.cos(4.1 * yy - p) for p in (0.0, 1.1, 2.3)])
    edges = ((xx * 7 + yy * 3).floor() % 2) * 0.2
    texture = 0.08 * torch.rand(3, h, w, generator=g)
    return (base + edges + texture).clamp(0, 1)[None]


def _straight_twin(up):
    """An Upscaler running the family's straight reference implementation with the same weights, or None for
    families with one path."""
    import dataclasses

    twin = up.architecture.straight_twin(up.model)
    return None if twin is None else dataclasses.replace(up, model=twin)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load(model: str, scale: int, weights: str | None, device: str, precision: str, tile: int | None,
          offline: bool, protocol: str = "auto"):
    from . import registry
    from .engine import EngineOptions, Upscaler
    from .weights import build_model

    entry = registry.resolve(model, scale)
    options = EngineOptions(protocol, precision, tile, device=device)  # a tile makes "auto" tiled
    if weights == "random":  # timing does not depend on the weights: no download needed
        import torch

        from .engine import OptionError, pick_device

        torch.manual_seed(0)
        try:
            dev = pick_device(device)
        except ValueError as e:
            raise OptionError("device", str(e)) from None
        net = build_model(entry).eval().requires_grad_(False).to(dev)
        return Upscaler(entry, net, dev, options.protocol, options.precision, options.tile, options.overlap)
    return Upscaler.load(entry, weights, options, offline=offline)


# -- the benchmark --------------------------------------------------------------------------------------------------

def run_bench(model: str = "agdn", scale: int = 4, sizes: Iterable[tuple[int, int] | str] = ((128, 128),),
              device: str = "cpu", precision: str = "fp32", tile: int | None = None, repeats: int = 5,
              warmup: int = 1, reference_impl: bool = True, threads: int | None = None, *,
              weights: str | None = None, offline: bool = False, folder_images: int = 3,
              image: str | None = None, protocol: str = "auto",
              folder_size: tuple[int, int] | None = None, force: bool = False, busy_threshold: float = 0.5,
              busy_interval: float = 1.0, seed: int = 0, log=None) -> list[dict[str, Any]]:
    """Time `model` x`scale` on generated images of each size (h, w) in LR pixels.

    Returns one dict per (size, implementation): "impl" is "fast" (the default inference path) or "straight"
    (the reference implementation, only for models that have both and with `reference_impl`); then one
    two "folder" dicts, "mode" sequential and overlapped (end-to-end: decode, infer, encode, write
    `folder_images` PNGs of `folder_size`, default the first size; 0 skips it). Latency is seconds per image; "mpix_per_s" counts output pixels.
    `weights`: a .safetensors file, None for the zoo's, or "random" (no file needed; timing is the same).
    `threads`: torch CPU threads for the run (default: the CPUs available to this process).
    `image`: a real image file, timed as users run it (one "image" row): the forward pass alone on its pixels
    and end to end (decode, upscale, encode, write, as `upscale FILE -o OUT` does it in-process), each per LR
    pixel and against the first size's forward per LR pixel, measured in the same run.
    `protocol`: the engine's protocol ("auto", as the CLI runs; a `tile` makes it tiled).
    Raises MachineBusyError when other processes already use more than `busy_threshold` of the CPUs
    (measured over `busy_interval` seconds before anything runs), unless `force`. `log`: a callable taking progress lines (e.g. print to
    stderr), or None.
    """
    import torch

    from .memory import PeakMemory

    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    sizes = [parse_size(s) if isinstance(s, str) else (int(s[0]), int(s[1])) for s in sizes]
    if not sizes:
        raise ValueError("give at least one size")
    n_threads = int(threads) if threads else available_cpus()
    say = log or (lambda line: None)

    up = _load(model, scale, weights, device, precision, tile, offline, protocol)  # a bad option fails first
    busy = cpu_busy(busy_interval)
    # the direct measurement decides; the 1-minute load average lags (it still counts processes that just
    # ended) and is only reported
    too_busy = busy["others"] > busy_threshold
    if too_busy:
        message = (f"the CPUs are already busy (other processes use {busy['others']:.0%} of each core, load average "
                   f"{busy['load_per_core']:.2f} per core; limit {busy_threshold:.2f}): timings would be "
                   f"meaningless")
        if not force:
            raise MachineBusyError(message + "; wait for a quiet machine or pass force")
        print(f"upscale bench: WARNING: {message}; timing anyway (force)", file=sys.stderr)

    twin = _straight_twin(up) if reference_impl else None
    runners = {"fast": up, "straight": twin} if twin is not None else {"fast": up}
    impls = list(runners)
    straight = twin is not None
    common = {"model": up.entry.name, "scale": up.scale, "device": str(up.device), "precision": up.working_precision,
              "tile": tile, "threads": n_threads, "repeats": repeats, "warmup": warmup, "busy": too_busy,
              "cpu_busy_before": round(busy["others"], 3), "load_per_core_before": round(busy["load_per_core"], 3),
              # what the fast path ran on (AGDN on the CPU: the fused kernels, or why not)
              "cpu_kernels": up.architecture.fast_path_status(up.model, up.device)}
    results: list[dict[str, Any]] = []
    memory_kind = PeakMemory(up.device).kind
    with _threads(n_threads):
        for h, w in sizes:
            x = _synthetic_image(h, w, seed)
            times: dict[str, list[float]] = {impl: [] for impl in impls}
            peaks: dict[str, tuple[float, float | None]] = {}
            used: dict[str, Any] = {}
            for impl, runner in runners.items():  # warm-up (and the memory peak of one call) per implementation
                if up.device.type == "cuda":
                    torch.cuda.empty_cache()
                with PeakMemory(up.device) as peak:
                    for _ in range(max(1, warmup)):
                        used[impl] = _used(runner.run(x)[1])
                        _sync(up.device)
                peaks[impl] = (peak.peak / 2**20, None if peak.extra is None else peak.extra / 2**20)
            for r in range(repeats):  # interleaved, so both implementations see the same machine
                for impl, runner in runners.items():
                    _sync(up.device)
                    t0 = time.perf_counter()
                    runner.run(x)
                    _sync(up.device)
                    times[impl].append(time.perf_counter() - t0)
                say(f"{up.entry.label} {h}x{w}: repeat {r + 1}/{repeats}")
            out_mpix = (h * up.scale) * (w * up.scale) / 1e6
            for impl in impls:
                lat = _spread(times[impl])
                row = {"kind": "latency", **common, "impl": impl, "size": [h, w],
                       "output_size": [h * up.scale, w * up.scale], "latency_s": lat,
                       "mpix_per_s": {k: out_mpix / v for k, v in lat.items() if k in ("median", "min", "max")},
                       "peak_memory_mb": round(peaks[impl][0], 1),
                       "peak_memory_extra_mb": None if peaks[impl][1] is None else round(peaks[impl][1], 1),
                       "memory_kind": memory_kind, "times_s": times[impl], **used[impl]}
                results.append(row)
            if straight:
                fast_row, straight_row = results[-2], results[-1]
                speed = straight_row["latency_s"]["median"] / fast_row["latency_s"]["median"]
                fast_row["speedup_vs_straight"] = straight_row["speedup_vs_straight"] = speed
        if image is not None:
            results.append(_image_run(up, image, repeats, warmup, results, {**common, "impl": "fast"}, say))
        if folder_images:
            results += _folder_run(up, folder_size or sizes[0], folder_images, seed, {**common, "impl": "fast" if straight else "default"}, say)
    # checked again afterwards (other processes only: the load average now includes this run itself)
    if too_busy or cpu_busy(0.2)["others"] > busy_threshold:
        for row in results:
            row["busy"] = True
    return results


def _used(stats) -> dict[str, Any]:
    """What the engine did on a case (from its RunStats): protocol, tile, tiles per call, fp32 fallbacks."""
    return {"protocol": stats.protocol, "tile_used": stats.tile, "tiles": stats.tiles,
            "tiles_per_forward": stats.tiles_per_forward, "fp32_fallbacks": stats.fp32_fallbacks,
            "notes": stats.notes}


def _image_run(up, path: str, repeats: int, warmup: int, earlier: list[dict], common: dict, say) -> dict[str, Any]:
    """A real image file: forward alone and end to end (the CLI's read -> upscale -> encode/write stages), per LR
    pixel, interleaved repeat by repeat; beside the forward per LR pixel of the first synthetic size."""
    import torch

    from .batch import UpscaleStages, plan_jobs, run_jobs
    from .imageio import KEEP_KIND, ImageError, read_image
    from .memory import PeakMemory

    loaded = read_image(path)
    h, w = loaded.rgb.shape[:2]
    x = torch.from_numpy(loaded.rgb.transpose(2, 0, 1).copy())[None]
    times: dict[str, list[float]] = {"forward": [], "end_to_end": []}
    with tempfile.TemporaryDirectory(prefix="upscale-bench-") as tmp:
        stages = UpscaleStages(up, None, overwrite=True, provenance={"model": up.entry.name, "scale": up.scale})

        def end_to_end(r: int) -> None:
            name = f"out{r}{KEEP_KIND.get(Path(path).suffix.lower(), '.png')}"  # what `upscale FILE` writes
            jobs = plan_jobs([path], str(Path(tmp, name)), up.scale).jobs
            outcomes = run_jobs(jobs, stages, overwrite=True, skip_existing=False, on_outcome=lambda o: None,
                                errors=(ImageError, OSError))
            if outcomes[0].status != "ok":
                raise RuntimeError(f"bench: {path}: {outcomes[0].error}")

        with PeakMemory(up.device) as peak:
            for _ in range(max(1, warmup)):
                stats = up.run(x)[1]
                _sync(up.device)
        for r in range(repeats):
            _sync(up.device)
            t0 = time.perf_counter()
            up.run(x)
            _sync(up.device)
            times["forward"].append(time.perf_counter() - t0)
            with PeakMemory(up.device) as e2e_peak:  # the last repeat's counts: the process as a user runs it
                t0 = time.perf_counter()
                end_to_end(r)
                times["end_to_end"].append(time.perf_counter() - t0)
            say(f"{up.entry.label} {Path(path).name} {h}x{w}: repeat {r + 1}/{repeats}")
    pixels = h * w
    per_pixel = {k: statistics.median(v) / pixels * 1e6 for k, v in times.items()}
    base = next((r for r in earlier if r["kind"] == "latency" and r["impl"] == "fast"), None)
    base_us = None if base is None else base["latency_s"]["median"] / (base["size"][0] * base["size"][1]) * 1e6
    return {"kind": "image", **common, "file": str(path), "size": [h, w],
            "output_size": [h * up.scale, w * up.scale],
            "forward_s": _spread(times["forward"]), "end_to_end_s": _spread(times["end_to_end"]),
            "times_s": times, "us_per_lr_pixel": per_pixel,
            "first_size_forward_us_per_lr_pixel": base_us,
            "vs_first_size_forward": None if base_us is None else {k: v / base_us for k, v in per_pixel.items()},
            "mpix_per_s": {k: pixels * up.scale**2 / 1e6 / statistics.median(v) for k, v in times.items()},
            "peak_memory_mb": round(peak.peak / 2**20, 1),
            "peak_memory_extra_mb": None if peak.extra is None else round(peak.extra / 2**20, 1),
            "end_to_end_peak_memory_mb": round(e2e_peak.peak / 2**20, 1),
            **_used(stats)}


def _folder_run(up, size: tuple[int, int], count: int, seed: int, common: dict, say,
                rounds: int = 2) -> list[dict[str, Any]]:
    """`count` generated PNGs through the batch pipeline of `upscale FOLDER -o OUT` (decode, upscale, encode,
    write atomically), sequential and overlapped (read-ahead, background writes), interleaved over `rounds`;
    one row per mode with the median total."""
    import numpy as np
    from PIL import Image

    from .batch import UpscaleStages, plan_jobs, run_jobs
    from .imageio import ImageError

    h, w = size
    totals: dict[str, list[float]] = {"sequential": [], "overlapped": []}
    written: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="upscale-bench-") as tmp:
        src = Path(tmp, "in")
        src.mkdir()
        for i in range(count):
            rgb = _synthetic_image(h, w, seed + i)[0].permute(1, 2, 0).numpy()
            Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).save(src / f"img{i:03d}.png")
        stages = UpscaleStages(up, "PNG", overwrite=True, provenance={"model": up.entry.name, "scale": up.scale})
        for r in range(rounds):
            for mode in totals:
                dst = Path(tmp, f"{mode}{r}")
                jobs = plan_jobs([str(src)], str(dst), up.scale).jobs
                t0 = time.perf_counter()
                outcomes = run_jobs(jobs, stages, overwrite=True, skip_existing=False, on_outcome=lambda o: None,
                                    errors=(ImageError, OSError), overlap=mode == "overlapped")
                totals[mode].append(time.perf_counter() - t0)
                failed = [o.error for o in outcomes if o.status != "ok"]
                if failed:
                    raise RuntimeError(f"bench folder run failed: {failed[0]}")
                written[mode] = sum(1 for _ in dst.iterdir())
    rows = []
    out_mpix = count * h * w * up.scale**2 / 1e6
    for mode, values in totals.items():
        total = statistics.median(values)
        say(f"{up.entry.label} folder of {count} x {h}x{w}, {mode}: {total:.2f} s")
        rows.append({"kind": "folder", **common, "mode": mode, "size": [h, w], "images": count, "written": written[mode], "rounds": rounds,
                     "seconds_total": total, "totals_s": values, "seconds_per_image": total / count,
                     "mpix_per_s": out_mpix / total})
    return rows


# -- presentation -------------------------------------------------------------------------------------------------

def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def format_table(results: list[dict[str, Any]], console=None):
    """A rich Table of `run_bench` results; printed to `console` when given (else returned only)."""
    from rich.table import Table

    title = "upscale bench"
    if results:
        r = results[0]
        title += f": {r['model']} x{r['scale']} on {r['device']}, {r['precision']}, {r['threads']} threads"
        if r.get("tile"):
            title += f", tile {r['tile']}"
    table = Table(title=title)
    for name, justify in (("case", "left"), ("impl", "left"), ("latency ms: median", "right"),
                          ("min-max", "right"), ("IQR", "right"), ("out MP/s", "right"),
                          ("peak mem MB", "right"), ("speed-up", "right")):
        table.add_column(name, justify=justify)
    for r in results:
        h, w = r["size"]
        if r["kind"] == "latency":
            lat = r["latency_s"]
            speed = r.get("speedup_vs_straight")
            table.add_row(f"{h}x{w}", r["impl"], _ms(lat["median"]), f"{_ms(lat['min'])}-{_ms(lat['max'])}",
                          f"{_ms(lat['q1'])}-{_ms(lat['q3'])}", f"{r['mpix_per_s']['median']:.2f}",
                          f"{r['peak_memory_mb']:.0f}",
                          "" if speed is None else (f"{speed:.2f}x" if r["impl"] == "fast" else "1.00x"))
        elif r["kind"] == "image":
            for what, key in (("forward", "forward_s"), ("end to end", "end_to_end_s")):
                lat = r[key]
                ratio = (r["vs_first_size_forward"] or {}).get(key[:-2])
                table.add_row(f"{Path(r['file']).name} {h}x{w}", f"{what}, {r['us_per_lr_pixel'][key[:-2]]:.2f} us/px",
                              _ms(lat["median"]), f"{_ms(lat['min'])}-{_ms(lat['max'])}",
                              f"{_ms(lat['q1'])}-{_ms(lat['q3'])}", f"{r['mpix_per_s'][key[:-2]]:.2f}",
                              f"{r['peak_memory_mb' if what == 'forward' else 'end_to_end_peak_memory_mb']:.0f}",
                              "" if ratio is None else f"{ratio:.2f}x per px")
        else:
            lo, hi = min(r["totals_s"]) / r["images"], max(r["totals_s"]) / r["images"]
            table.add_row(f"folder {r['images']} x {h}x{w}", f"{r['mode']}, per image", _ms(r["seconds_per_image"]),
                          f"{_ms(lo)}-{_ms(hi)}", "", f"{r['mpix_per_s']:.2f}", "", "")
    notes = []
    if results and results[0]["kind"] == "latency" and results[0]["device"] == "cpu":
        notes.append("peak mem: " + results[0]["memory_kind"])
    if any(r["kind"] == "image" for r in results):
        notes.append("speed-up column, image rows: time per LR pixel over the first size's forward")
    if results and results[0].get("cpu_kernels"):
        notes.append("fast path on " + results[0]["cpu_kernels"])
    if any(r.get("busy") for r in results):
        notes.append("WARNING: the machine was busy; these timings are not reliable")
    if notes:
        table.caption = "; ".join(notes)
    if console is not None:
        console.print(table)
    return table
