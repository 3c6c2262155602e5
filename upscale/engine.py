"""Running a loaded network on images: device, precision, protocol, whole-image or tiled execution.

`Upscaler` is what the CLI, `upscale eval` and the Python API all call, so a test of it is a test of them.
Protocols:
- "reference": the family's official test-time procedure (`Architecture.reference_forward`): what the
  papers measured and what `upscale eval` uses by default.
- "whole": one plain forward pass over the whole image.
- "tiled": tiles with local statistics (see `tiling.py` and `Architecture.tiling_spec`), so that memory grows
  with the tile, not the image, and a pixel gets the same statistics whichever tile computes it.
- "auto": "reference" when the whole image fits the memory budget, else "tiled" ("tiled" when a tile is set).
Precision: fp32, tf32, fp16, bf16 or auto (fp16 on CUDA, fp32 on the CPU). "fp32" is IEEE float32 everywhere
(TF32 off on CUDA, which PyTorch otherwise allows for convolutions); "tf32" allows it. A tile whose
half-precision output is not finite is recomputed in fp32. Out of memory is never fatal while a smaller tile
exists (see `Upscaler.run`). The options are checked once, in `options.EngineOptions`. `run` returns its
output with a `RunStats` (what it did, fallbacks counted, notes for the user): the engine prints nothing,
its caller reports.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import memory, tiling
from .models import Architecture, get_architecture
from .models.base import MemoryEstimate, Placement, TilingSpec
from .models.layers import mirror_pad, pad_to_multiple
from .options import DEFAULT_OVERLAP, MIN_TILE, EngineOptions, OptionError
from .registry import ModelEntry
from .weights import load_model, resolve_weights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def available_devices() -> list[str]:
    """The devices this machine can run on, as `--device` takes them."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given ("cpu", "cuda", "cuda:1"), else CUDA when present, else the CPU.

    Raises ValueError, one line listing what this machine has, for a device that is unknown or absent."""
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = available_devices()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    ok = device is not None and (
        device.type == "cpu" and device.index in (None, 0)
        or device.type == "cuda" and torch.cuda.is_available()
        and (device.index is None or device.index < torch.cuda.device_count())
        or device.type == "mps" and "mps" in available and device.index in (None, 0))
    if not ok:
        why = "is not a device" if device is None else "is not available on this machine"
        raise ValueError(f"{name!r} {why} (available: {', '.join(available)})")
    return device


class NonFiniteOutputError(RuntimeError):
    """The network produced NaN or Inf in float32: broken weights or input, never a black image."""


def _all_finite(y: torch.Tensor) -> bool:
    """No NaN or Inf in y: its minimum and maximum are finite (both carry a NaN through). One reduction, without
    the boolean map `isfinite` makes: on a 2752 x 2112 output tile 3 ms instead of 55."""
    if y.numel() == 0:
        return True
    lo, hi = torch.aminmax(y)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def pad_to_min_size(x: torch.Tensor, min_size: int) -> torch.Tensor:
    """Extend an image smaller than the network's minimum by mirroring at the bottom/right."""
    h, w = x.shape[-2:]
    return mirror_pad(x, 0, max(0, min_size - w), 0, max(0, min_size - h))


@contextmanager
def float32_matmul_mode(tf32: bool):
    """Within: float32 convolutions and matrix products on CUDA in IEEE float32, or in TF32 when `tf32`; restored
    afterwards. PyTorch lets cuDNN use TF32 for float32 convolutions by default, which misses the golden
    tolerance: "fp32" means float32 here. (The flags only act on CUDA; setting them elsewhere is harmless, which
    is how the CPU tests check them.)"""
    new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")
    if new_api:  # torch >= 2.9: the legacy allow_tf32 flags must not be mixed with these
        targets = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
        previous = [t.fp32_precision for t in targets]
        for t in targets:
            t.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        previous = [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        if new_api:
            for t, value in zip(targets, previous):
                t.fp32_precision = value
        else:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _sides(tile: int | tuple[int, int]) -> tuple[int, int]:
    return (tile, tile) if isinstance(tile, int) else tuple(tile)


def tile_text(tile: int | tuple[int, int] | None) -> str:
    """A tile size for people: "373", or "427x480" (rows x columns)."""
    if tile is None or isinstance(tile, int):
        return str(tile)
    return f"{tile[0]}x{tile[1]}"


@dataclass
class RunStats:
    """What one `run` did, returned with its output: protocol, tile, tiles per forward call, precision,
    fallbacks, and notes for the user (a tile recomputed in fp32, an out-of-memory retry) that the caller
    reports."""

    protocol: str = ""
    tile: int | tuple[int, int] | None = None  # core side, or (rows, columns) when not square
    precision: str = "fp32"
    tiles: int = 1
    fp32_fallbacks: int = 0
    notes: list[str] = field(default_factory=list)
    tiles_per_forward: int = 1
    forward_calls: int = 0

    def __add__(self, other: "RunStats") -> "RunStats":
        """Two passes over one image (colour and alpha): counts add up, notes are kept once each."""
        return RunStats(self.protocol, self.tile, self.precision, self.tiles + other.tiles,
                        self.fp32_fallbacks + other.fp32_fallbacks, list(dict.fromkeys(self.notes + other.notes)),
                        self.tiles_per_forward, self.forward_calls + other.forward_calls)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


@dataclass
class Upscaler:
    """A network ready to run: registry entry, loaded model, device, protocol, precision, tiling."""

    entry: ModelEntry
    model: nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    protocol: str = "reference"
    precision: str = "auto"
    #: LR px per tile core side, or (rows, columns); None: from the memory budget and the image
    tile: int | tuple[int, int] | None = None
    overlap: int = DEFAULT_OVERLAP  # blend width across tile seams, LR px
    #: tiles per forward call (block-mode tiles, ASID's official tiler); None: from the device and the memory
    #: budget (see `_tiles_per_forward`)
    tile_batch: int | None = None
    #: where tiled outputs are blended: None: on the device when the whole output fits its budget, else on
    #: the host; True/False force either (the tests run the host-copy path of a GPU on the CPU this way)
    blend_on_device: bool | None = None

    @property
    def architecture(self) -> Architecture:
        return get_architecture(self.entry.family)

    @property
    def scale(self) -> int:
        return self.entry.scale

    @classmethod
    def load(cls, entry: ModelEntry, weights: str | None = None, options: EngineOptions = EngineOptions(),
             offline: bool = False) -> "Upscaler":
        """The entry's network with `weights` (a file; None: resolved from the zoo), run as `options` say."""
        try:
            dev = pick_device(options.device)
        except ValueError as e:
            raise OptionError("device", str(e)) from None
        model = load_model(entry, resolve_weights(entry, weights, offline=offline)).to(dev)
        return cls(entry, model, dev, options.protocol, options.precision, options.tile, options.overlap)

    # -- precision ---------------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        if self.precision == "auto":
            return torch.float16 if self.device.type == "cuda" else torch.float32
        return torch.float32 if self.precision == "tf32" else DTYPES[self.precision]

    @property
    def working_precision(self) -> str:
        """"fp32", "tf32", "fp16" or "bf16": what "auto" means on this device."""
        return "tf32" if self.precision == "tf32" else next(n for n, d in DTYPES.items() if d == self._dtype())

    def _forward(self, fn, x: torch.Tensor, stats: RunStats) -> torch.Tensor:
        """fn(x) in the working precision; a non-finite result is recomputed in fp32 (counted in `stats`)."""
        dtype = self._dtype()
        stats.forward_calls += 1
        with float32_matmul_mode(self.precision == "tf32"):
            if dtype != torch.float32:
                with torch.autocast(self.device.type, dtype=dtype):
                    y = fn(x)
                if _all_finite(y):
                    return y.float()
                stats.fp32_fallbacks += 1
                stats.note(f"non-finite {stats.precision} output, recomputed in fp32")
            y = fn(x).float()
        if not _all_finite(y):
            raise NonFiniteOutputError("the network's output holds NaN or Inf in float32 (broken weights?); "
                                       "no image written")
        return y

    # -- memory ----------------------------------------------------------------------------------------------
    def memory_estimate(self) -> MemoryEstimate:
        """Peak memory of one forward pass on this device in this precision: the family's measured figure
        (`Architecture.memory_estimate`), or UPSCALE_BYTES_PER_PIXEL when set (to force tiling in tests)."""
        override = int(os.environ.get("UPSCALE_BYTES_PER_PIXEL", 0))
        if override:
            return MemoryEstimate(0, override)
        return self.architecture.memory_estimate(self.model, self.device, self._dtype())

    def _auto_tile(self, height: int, width: int) -> int | tuple[int, int]:
        """Tile cores for an image of height x width (padded to the family's multiple) whose inputs (core plus
        halo) fit the memory budget. Halo tiles: the grid that computes the fewest pixels, its cores chosen per
        axis (`tiling.fit_halo_tiles`), as (rows, columns), or one side when square; block tiles: the largest
        square."""
        spec = self.architecture.tiling_spec(self.model)
        pixels = self.memory_estimate().pixels_within(memory.budget(self.device))
        if spec.local_mode != "placement":
            return max(MIN_TILE, min(int(pixels**0.5), 1024))
        rows, cols = tiling.fit_halo_tiles(height, width, pixels, self._halo(spec), spec.alignment,
                                           min_side=MIN_TILE, max_side=1024)
        return rows if rows == cols else (rows, cols)

    def _halo(self, spec: TilingSpec) -> int:
        return max(spec.halo, -(-self.overlap // 2))

    def _tiles_per_forward(self, tile_pixels: int) -> int:
        """How many tiles of `tile_pixels` one forward call takes: `tile_batch` when set; on a GPU as many as the
        budget holds (up to 64: one call per tile is launch-bound there); on the CPU about 16 K input pixels per
        call, within the budget. Measured on 2 CPU cores, 256 x 256 at x2, median of 3: ASID's 64 px tiles 4 per
        call 3.4 s vs 4.6 s one at a time (reference; tiled 4.1 vs 4.5 s), 16 per call 3.8 s; ESC-light's
        128 px blocks gain nothing from a batch (5.0 s at 1 and 4, 7.0 s at 16)."""
        if self.tile_batch:
            return self.tile_batch
        fits = max(1, self.memory_estimate().pixels_within(memory.budget(self.device)) // tile_pixels)
        if self.device.type == "cpu":
            return max(1, min(fits, 16384 // tile_pixels))
        return min(64, fits)

    def _blend_on_device(self, output_bytes: int) -> bool:
        if self.blend_on_device is not None:
            return self.blend_on_device
        return self.device.type == "cpu" or output_bytes <= memory.budget(self.device) // 2

    # -- execution -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, lr: torch.Tensor, on_rows: tiling.RowSink | None = None) -> tuple[torch.Tensor | None, RunStats]:
        """(N, 3, h, w) float in [0, 1] -> ((N, 3, s*h, s*w) on the [0, 1] scale, unclamped, on the CPU; what
        the run did).

        With `on_rows` the output is handed over in bands of rows as they are finished instead, and None is
        returned in its place: `on_rows(top, band)` gets rows [top, top + band rows) as an (N, 3, rows, s*w)
        float32 CPU tensor, valid only during the call, from the top down; a tiled run holds only the rows its
        later tiles reach, not the whole output (a 12 MP photo at x2: 576 MB). A pass restarted after running
        out of memory hands its rows over again from the top, so a consumer stores each band at its rows.

        Out of memory never fails an image while a smaller tile exists: a whole-image pass that runs out is
        redone in tiles, and tiles that run out are halved (fewer per call first, then smaller), down to the
        smallest; the ladder is said once in `RunStats.notes`."""
        h, w = lr.shape[-2:]
        if h == 0 or w == 0:
            raise ValueError(f"empty image ({h} x {w} pixels): nothing to upscale")
        x = pad_to_min_size(lr.to(torch.float32), self.architecture.min_size)
        out_h, out_w = h * self.scale, w * self.scale
        sink = None
        if on_rows is not None:

            def sink(top: int, band: torch.Tensor) -> None:  # the image's own rows and columns, on the CPU
                if top < out_h:
                    on_rows(top, band[..., : out_h - top, :out_w].to("cpu", torch.float32))

        protocol = self.protocol
        if protocol == "auto":
            fits = self.memory_estimate().bytes_for(x.shape[-2] * x.shape[-1]) <= memory.budget(self.device)
            protocol = "reference" if fits and self.tile is None else "tiled"
        stats = RunStats(protocol=protocol, precision=self.working_precision)
        y = None
        if protocol != "tiled":
            y = self._run_whole(x, protocol, stats)
            if y is None:  # out of memory even one tile per call: tiles with local statistics
                memory.free_cache(self.device)
                stats.protocol = "tiled"
                y = self._run_tiled(x, stats, sink, ran_out=f"the whole image ({protocol})")
            elif sink is not None:
                sink(0, y)
                y = None
        else:
            y = self._run_tiled(x, stats, sink)
        self.architecture.release_scratch(self.model)
        return (None if y is None else y[..., :out_h, :out_w].float()), stats

    def _run_whole(self, x: torch.Tensor, protocol: str, stats: RunStats) -> torch.Tensor | None:
        """One pass over the whole image (or the family's official procedure); None when it ran out of memory.
        A tiled official procedure (ASID's) first retries with fewer of its tiles per call, which keeps its
        result; only then does the caller fall back to tiles."""
        arch = self.architecture
        side = arch.reference_tile if protocol == "reference" else None  # ASID's: its tiles are batched
        batch = self._tiles_per_forward(side * side) if side else 1
        first = batch
        while True:
            stats.tiles_per_forward = batch

            def fn(t, batch=batch):
                return arch.reference_forward(self.model, t, batch) if protocol == "reference" else self.model(t)

            try:
                y = self._forward(fn, x.to(self.device).contiguous(), stats).cpu()
                break
            except RuntimeError as e:
                if not memory.is_out_of_memory(e):
                    raise
            memory.free_cache(self.device)
            if batch <= 1:
                return None
            batch //= 2
        if batch < first:
            stats.note(f"out of memory with {first} of its {side}-px tiles per call; finished with {batch}")
        return y

    def _run_tiled(self, x: torch.Tensor, stats: RunStats, sink: tiling.RowSink | None = None,
                   ran_out: str | None = None) -> torch.Tensor | None:
        m = self.architecture.tiling_spec(self.model).pad_multiple
        tile = self.tile or self._auto_tile(-(-x.shape[-2] // m) * m, -(-x.shape[-1] // m) * m)
        batch = None  # from `tile_plan`
        while True:
            try:
                y = self._tiled_pass(x, tile, batch, stats, sink)
                break
            except RuntimeError as e:
                batch = stats.tiles_per_forward  # what the failed pass used
                smallest = self._block_mode or min(_sides(tile)) <= MIN_TILE
                if not memory.is_out_of_memory(e) or (batch <= 1 and smallest):
                    raise
                what = f"tiles of {tile_text(stats.tile)}" + (f", {batch} per call" if batch > 1 else "")
            memory.free_cache(self.device)
            ran_out = ran_out or what
            if batch > 1:
                batch //= 2
            else:
                rows, cols = (max(MIN_TILE, side // 2) for side in _sides(tile))
                tile = rows if rows == cols else (rows, cols)
        if ran_out:
            per_call = stats.tiles_per_forward
            used = f"tiles of {tile_text(stats.tile)}" + (f", {per_call} per call" if per_call > 1 else "")
            stats.note(f"out of memory with {ran_out}; finished with {used}")
        return y

    @property
    def _block_mode(self) -> bool:
        return self.architecture.tiling_spec(self.model).local_mode == "blocks"

    def tile_plan(self, height: int, width: int, tile: int | tuple[int, int], batch: int | None = None
                  ) -> tuple[list[tiling.Tile], int, int]:
        """(tiles, tiles per forward, blend width) for an image padded to the family's multiple."""
        spec = self.architecture.tiling_spec(self.model)
        if spec.local_mode == "placement":
            halo = self._halo(spec)
            tiles = tiling.plan_halo_tiles(height, width, tile, halo, spec.alignment)
            if not spec.batched_placements:
                return tiles, 1, self.overlap
            rows, cols = _sides(tile)
            return tiles, batch or self._tiles_per_forward((rows + 2 * halo) * (cols + 2 * halo)), self.overlap
        batch = batch or self._tiles_per_forward(spec.block**2)
        return tiling.plan_blocks(height, width, spec.block, spec.block_overlap), batch, spec.block_overlap

    def _tiled_pass(self, x: torch.Tensor, tile: int | tuple[int, int], batch: int | None, stats: RunStats,
                    sink: tiling.RowSink | None = None) -> torch.Tensor | None:
        arch = self.architecture
        spec = arch.tiling_spec(self.model)
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, spec.pad_multiple)
        big_h, big_w = x.shape[-2:]
        tiles, batch, blend = self.tile_plan(big_h, big_w, tile, batch)
        on_cpu = self.device.type == "cpu"
        if spec.local_mode == "placement":

            def fn(inputs, chunk):
                placements = [Placement((big_h, big_w), (t.input[0], t.input[2])) for t in chunk]
                placement = placements[0] if len(placements) == 1 else placements
                y = self._forward(lambda z: arch.local_forward(self.model, z, placement), inputs.to(self.device),
                                  stats)
                if on_cpu:
                    memory.release_free_memory()
                return y

        else:

            def fn(inputs, chunk):
                y = self._forward(self.model, inputs.to(self.device), stats)
                if on_cpu:
                    memory.release_free_memory()
                return y

        stats.tile = spec.block if spec.local_mode == "blocks" else tile
        stats.tiles, stats.tiles_per_forward = len(tiles), batch
        output_bytes = x.shape[0] * 3 * big_h * big_w * self.scale**2 * 4
        out_device = self.device if self._blend_on_device(output_bytes) else torch.device("cpu")
        y = tiling.run_tiles(fn, x, tiles, self.scale, blend, batch=batch, out_device=out_device, on_rows=sink)
        return None if y is None else y[..., : h * self.scale, : w * self.scale].cpu()

    def upscale_array(self, rgb: np.ndarray, on_rows: Callable[[int, np.ndarray], None] | None = None
                      ) -> tuple[np.ndarray | None, RunStats]:
        """HxWx3 float32 in [0, 1] -> ((s*H)x(s*W)x3 float32 clamped to [0, 1], a channels-last view; stats).

        With `on_rows`, the output goes to `on_rows(top, rows)` band by band instead (rows x (s*W) x 3 views, as
        `run` hands them over) and None is returned in its place."""
        # a CHW view of the caller's array, not a copy beside it (a 12 MP photo: 144 MB): tiles are cut from it,
        # and a whole-image pass makes its own contiguous copy
        a = np.ascontiguousarray(rgb, dtype=np.float32)
        x = torch.from_numpy(a if a.flags.writeable else a.copy()).permute(2, 0, 1)[None]  # read-only: torch warns
        with torch.inference_mode():
            if on_rows is not None:
                return self.run(x, lambda top, band: on_rows(top, band[0].clamp_(0, 1).permute(1, 2, 0).numpy()))
            y, stats = self.run(x)
            y = y[0].clamp_(0, 1)  # in place: the output of a photo is gigabytes
        return y.permute(1, 2, 0).numpy(), stats
