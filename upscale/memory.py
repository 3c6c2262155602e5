"""Memory: how much one forward pass may use, how much it did use, and what an out-of-memory error looks like.

The engine plans tiles from `budget` and a family's measured estimate (`Architecture.peak_bytes_per_pixel`);
`PeakMemory` is the one measurement behind those estimates, their test and `upscale bench`:
- CUDA (and any device with PyTorch's caching allocator): `max_memory_allocated` since the start, minus what
  was allocated at the start.
- CPU: the process's resident-set high-water mark (`VmHWM`), reset at the start where Linux allows it
  (`/proc/self/clear_refs`), minus the resident set at the start. It counts everything the forward touched,
  allocator slack and the fused kernels' own buffers included (PyTorch's profiler sees neither).
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache

import torch

# Messages of allocation failures that are not `torch.OutOfMemoryError`: cuDNN and cuBLAS report theirs as
# a plain RuntimeError with their status name, the CPU allocator with its own words.
_OOM_MARKERS = ("out of memory", "cudnn_status_alloc_failed", "cublas_status_alloc_failed",
                "cudnn_status_not_enough_workspace", "can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` means "not enough memory for this size" (so a smaller tile may succeed)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MARKERS)


def _device_memory(device: torch.device) -> tuple[int, int, int] | None:
    """(free bytes by the driver, bytes PyTorch has reserved, bytes PyTorch has allocated) on an accelerator with
    PyTorch's caching allocator, else None."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    return None


def budget(device: torch.device) -> int:
    """Bytes the engine lets one forward pass use.

    On CUDA: 80 % of what this process could use, i.e. the driver's free memory plus PyTorch's cache
    (reserved but not allocated). Counting the cache matters: the driver's free memory alone shrinks after
    the first image fills the cache, so later images in a batch were planned smaller than the first and the
    output depended on the batch order. On the CPU: a quarter of the available RAM, at most 768 MiB, so that
    a 24 MP photo's output buffer (1.15 GB at x4) fits beside it."""
    if (info := _device_memory(device)) is not None:
        free, reserved, allocated = info
        return int((free + reserved - allocated) * 0.8)
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() * 0.5) if hasattr(torch.mps, "recommended_max_memory") \
            else 2 << 30
    return int(min(available_ram() * 0.25, 768 << 20))


def available_ram() -> int:
    """Bytes of RAM the system can give without swapping (MemAvailable); 4 GiB where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 << 30


def free_cache(device: torch.device) -> None:
    """Return PyTorch's cached blocks on `device` (not the current device) to the driver, after an OOM."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
    release_free_memory()


@cache
def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere."""
    try:
        return ctypes.CDLL(None).malloc_trim if sys.platform == "linux" else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS. Between CPU tiles: glibc keeps the freed buffers of one tile's
    forward in its heap, and with the holes between the next tiles' buffers the process grew with the number
    of tiles, not with the tile (a 3000 x 2000 photo at x4 on the CPU: peak RSS 2.84 GB before, 2.43 GB with
    this after every tile, the same 91-93 s)."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


# -- measurement ------------------------------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_cpu_peak() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak` (bytes: the device's peak allocation, or the process's
    RSS peak on the CPU) and `m.extra` (bytes above what was held at the start; None where the CPU peak could
    not be reset, so only the lifetime peak is known)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.kind = ("torch.cuda.max_memory_allocated" if self.device.type == "cuda"
                     else "process RSS high-water mark (VmHWM, whole process)")
        self.peak: int = 0
        self.extra: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self._reset = True
        else:
            release_free_memory()
            self._reset = _reset_cpu_peak()
            self._base = (_status_kb("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _status_kb("VmHWM")
            if hwm is None:
                import resource

                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            self.peak = hwm * 1024
        self.extra = max(0, self.peak - self._base) if self._reset else None
