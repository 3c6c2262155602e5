"""Running a loaded network on images: device, precision, protocol, whole-image or tiled execution.

`Upscaler` is what the CLI, `upscale eval` and the Python API all call, so a test of it is a test of them.
Protocols:
- "reference": the family's official test-time procedure (`Architecture.reference_forward`): what the
  papers measured and what `upscale eval` uses by default.
- "whole": one plain forward pass over the whole image.
- "tiled": tiles with local statistics (see `tiling.py` and `Architecture.tiling_spec`), so that memory grows
  with the tile, not the image, and a pixel gets the same statistics whichever tile computes it.
- "auto": "reference" when the whole image fits the memory budget, else "tiled" ("tiled" when a tile is set).
Precision: fp32, fp16, bf16 or auto (fp16 on CUDA, fp32 on the CPU). A tile whose half-precision output is not
finite is recomputed in fp32. The options are checked once, in `options.EngineOptions`. `run` returns its
output with a `RunStats` (what it did, fallbacks counted, notes for the user): the engine prints nothing,
its caller reports.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
from torch import nn

from . import tiling
from .models import Architecture, get_architecture
from .models.base import Placement
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


def pad_to_min_size(x: torch.Tensor, min_size: int) -> torch.Tensor:
    """Extend an image smaller than the network's minimum by mirroring at the bottom/right."""
    h, w = x.shape[-2:]
    return mirror_pad(x, 0, max(0, min_size - w), 0, max(0, min_size - h))


def memory_budget(device: torch.device) -> int:
    """Bytes the engine lets one forward pass use: most of the free GPU memory; on the CPU a quarter of the
    available RAM, at most 768 MiB, so that a 24 MP photo's output buffer (1.15 GB at x4) fits beside it."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7)
    available = 4 << 30
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    return int(min(available * 0.25, 768 << 20))


@cache
def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(None).malloc_trim if sys.platform == "linux" else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS. Between tiles: glibc keeps the freed buffers of one tile's
    forward in its heap, and with the holes between the next tiles' buffers the process grew with the number
    of tiles, not with the tile (a 3000 x 2000 photo at x4 on the CPU: peak RSS 2.84 GB before, 2.43 GB with
    this after every tile, the same 91-93 s)."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


@dataclass
class RunStats:
    """What one `run` did, returned with its output: protocol, tile, precision, fallbacks, and notes for the
    user (a tile recomputed in fp32, an out-of-memory retry) that the caller reports."""

    protocol: str = ""
    tile: int | None = None
    precision: str = "fp32"
    tiles: int = 1
    fp32_fallbacks: int = 0
    notes: list[str] = field(default_factory=list)

    def __add__(self, other: "RunStats") -> "RunStats":
        """Two passes over one image (colour and alpha): counts add up, notes are kept once each."""
        return RunStats(self.protocol, self.tile, self.precision, self.tiles + other.tiles,
                        self.fp32_fallbacks + other.fp32_fallbacks, list(dict.fromkeys(self.notes + other.notes)))


@dataclass
class Upscaler:
    """A network ready to run: registry entry, loaded model, device, protocol, precision, tiling."""

    entry: ModelEntry
    model: nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    protocol: str = "reference"
    precision: str = "auto"
    tile: int | None = None  # LR px per tile core; None: from the memory budget
    overlap: int = DEFAULT_OVERLAP  # blend width across tile seams, LR px
    tile_batch: int | None = None  # tiles per forward in block mode; None: (tile // block)^2 on CUDA, 1 on the CPU

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
        return DTYPES[self.precision]

    @property
    def working_precision(self) -> str:
        """"fp32", "fp16" or "bf16": what "auto" means on this device."""
        return next(name for name, dtype in DTYPES.items() if dtype == self._dtype())

    def _forward(self, fn, x: torch.Tensor, stats: RunStats) -> torch.Tensor:
        """fn(x) in the working precision; a non-finite result is recomputed in fp32 (counted in `stats`)."""
        dtype = self._dtype()
        if dtype != torch.float32:
            with torch.autocast(self.device.type, dtype=dtype):
                y = fn(x)
            if torch.isfinite(y).all():
                return y.float()
            stats.fp32_fallbacks += 1
            stats.notes.append(f"non-finite {stats.precision} output, recomputed in fp32")
        y = fn(x).float()
        if not torch.isfinite(y).all():
            raise NonFiniteOutputError("the network's output holds NaN or Inf in float32 (broken weights?); "
                                       "no image written")
        return y

    # -- execution -----------------------------------------------------------------------------------------
    def _bytes_per_pixel(self) -> int:
        """Rough peak memory of one forward pass per LR input pixel. A model may know better
        (`bytes_per_pixel(device, dtype)`, e.g. AGDN on its fused CPU kernels: ~2.8 KB measured); otherwise the
        general estimate (AGDN x4 on the CPU in fp32: a 900 x 600 photo in tiles of 299 x 299 inputs peaked at
        1.76 GB RSS, ~16 KB per tile pixel over the baseline and the output; ESC-XL's 192 channels need more)."""
        override = int(os.environ.get("UPSCALE_BYTES_PER_PIXEL", 0))
        if override:
            return override
        own = getattr(self.model, "bytes_per_pixel", None)
        if callable(own) and (known := own(self.device, self._dtype())):
            return int(known)
        params = sum(p.numel() for p in self.model.parameters())
        return 48_000 if params > 5_000_000 else 16_000

    def _auto_tile(self) -> int:
        """The largest tile core whose input (core plus halo on both sides) fits the memory budget."""
        spec = self.architecture.tiling_spec(self.model)
        context = 2 * max(spec.halo, self.overlap // 2) if spec.local_mode == "placement" else 0
        side = int((memory_budget(self.device) / self._bytes_per_pixel()) ** 0.5) - context
        return max(MIN_TILE, min(side, 1024))

    @torch.inference_mode()
    def run(self, lr: torch.Tensor) -> tuple[torch.Tensor, RunStats]:
        """(N, 3, h, w) float in [0, 1] -> ((N, 3, s*h, s*w) on the [0, 1] scale, unclamped, on the CPU; what
        the run did)."""
        h, w = lr.shape[-2:]
        if h == 0 or w == 0:
            raise ValueError(f"empty image ({h} x {w} pixels): nothing to upscale")
        arch = self.architecture
        x = pad_to_min_size(lr.to(torch.float32), arch.min_size)
        protocol = self.protocol
        if protocol == "auto":
            fits = x.shape[-2] * x.shape[-1] * self._bytes_per_pixel() <= memory_budget(self.device)
            protocol = "reference" if fits and self.tile is None else "tiled"
        stats = RunStats(protocol=protocol, precision=self.working_precision)
        if protocol == "tiled":
            y = self._run_tiled(x, stats)
        else:
            fn = (lambda t: arch.reference_forward(self.model, t)) if protocol == "reference" else self.model
            y = self._forward(fn, x.to(self.device), stats).cpu()
        return y[..., : h * self.scale, : w * self.scale].float(), stats

    def _run_tiled(self, x: torch.Tensor, stats: RunStats) -> torch.Tensor:
        tile = self.tile or self._auto_tile()
        while True:
            try:
                return self._tiled_pass(x, tile, stats)
            except RuntimeError as e:  # out of memory: retry with a smaller tile
                if not is_out_of_memory(e) or tile <= MIN_TILE:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                tile = max(MIN_TILE, tile // 2)
                stats.notes.append(f"out of memory, retried with tiles of {tile}")

    def tile_plan(self, height: int, width: int, tile: int) -> tuple[list[tiling.Tile], int, int]:
        """(tiles, tiles per forward, blend width) for an image padded to the family's multiple."""
        spec = self.architecture.tiling_spec(self.model)
        if spec.local_mode == "placement":
            halo = max(spec.halo, -(-self.overlap // 2))
            return tiling.plan_halo_tiles(height, width, tile, halo, spec.alignment), 1, self.overlap
        batch = self.tile_batch or (max(1, (tile // spec.block) ** 2) if self.device.type == "cuda" else 1)
        return tiling.plan_blocks(height, width, spec.block, spec.block_overlap), batch, spec.block_overlap

    def _tiled_pass(self, x: torch.Tensor, tile: int, stats: RunStats) -> torch.Tensor:
        arch = self.architecture
        spec = arch.tiling_spec(self.model)
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, spec.pad_multiple)
        big_h, big_w = x.shape[-2:]
        tiles, batch, blend = self.tile_plan(big_h, big_w, tile)
        if spec.local_mode == "placement":

            def fn(inputs, chunk):
                t = chunk[0]
                placement = Placement((big_h, big_w), (t.input[0], t.input[2]))
                y = self._forward(lambda z: arch.local_forward(self.model, z, placement), inputs.to(self.device),
                                  stats)
                release_free_memory()
                return y

        else:

            def fn(inputs, chunk):
                y = self._forward(self.model, inputs.to(self.device), stats)
                release_free_memory()
                return y

        stats.tile, stats.tiles = tile, len(tiles)
        y = tiling.run_tiles(fn, x, tiles, self.scale, blend, batch=batch)
        return y[..., : h * self.scale, : w * self.scale]

    def upscale_array(self, rgb: np.ndarray) -> tuple[np.ndarray, RunStats]:
        """HxWx3 float32 in [0, 1] -> ((s*H)x(s*W)x3 float32 clamped to [0, 1], a channels-last view; stats)."""
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
        with torch.inference_mode():
            y, stats = self.run(x)
            y = y[0].clamp_(0, 1)  # in place: the output of a photo is gigabytes
        return y.permute(1, 2, 0).numpy(), stats
