"""The contract between a model family and the rest of `upscale`.

Every family package (`agdn/`, `esc/`, `asid/`) exports one `ARCHITECTURE` object, a subclass of
`Architecture`. The registry, the weights pipeline and the engine talk to a family only through it, so they
never need an `if family == ...` branch.

The network contract, the same for every family:
- `model(x)` takes a float batch (N, 3, H, W) of RGB in [0, 1] and returns (N, 3, s*H, s*W) on the same
  [0, 1] scale, unclamped. Any input-range conversion (ASID works in [-1, 1]) and any internal padding the
  network needs happen inside `forward`.
- Every sample of a batch is computed independently: a batch of N images gives each exactly what a batch of
  one gives (the official eval code of several families assumes batch 1; ours must not).
- `state_dict()` uses the official key names, so official checkpoints load with `strict=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from . import kernels


@dataclass(frozen=True)
class Placement:
    """Where a tile sits: the whole image's size and the tile input's top-left corner, in LR pixels.

    Networks that take a placement compute every position-dependent or global operation in the image's
    absolute coordinates, so that a pixel gets the same result whichever tile computes it.
    """

    image_size: tuple[int, int]
    offset: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class TilingSpec:
    """How the tiled engine keeps tiles consistent with each other (see `engine.py` / `tiling.py`).

    "placement": `local_forward` gets each tile's `Placement`; tile inputs start on multiples of `alignment`
    and carry `halo` pixels of context on inner edges. "blocks": the image is cut into fixed blocks of `block`
    px on a grid anchored at (0, 0) (stride block - block_overlap), each run on its own and blended smoothly;
    execution tiles are unions of blocks. Either way the whole image is first reflect-padded to a multiple of
    `pad_multiple` (window grids anchored at (0, 0)). `batched_placements`: `local_forward` also takes a list of
    placements, one per tile of a batch, so that placement tiles of one shape can share a forward call."""

    local_mode: str  # "placement" or "blocks"
    alignment: int = 1
    halo: int = 0
    block: int = 0
    block_overlap: int = 0
    pad_multiple: int = 1
    batched_placements: bool = False


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one forward pass: `fixed` bytes plus `per_pixel` bytes per LR input pixel, output included.

    Each family declares measured figures with a margin (`Architecture.memory_estimate`); `tests/test_memory.py`
    measures the real peak at two sizes per family and precision and fails if it exceeds the estimate."""

    fixed: int
    per_pixel: int

    def bytes_for(self, pixels: int) -> int:
        return self.fixed + self.per_pixel * pixels

    def pixels_within(self, budget: int) -> int:
        """The most LR pixels one forward may take within `budget` bytes (0 when even the fixed part exceeds it)."""
        return max(0, budget - self.fixed) // self.per_pixel


KB, MB = 1024, 2**20


#: scratch a fast path keeps from one run to the next: one small image's maps (AGDN at 128 x 128: ~20 MB), so that
#: a folder of small images is not page-faulted in afresh per image (+10 ms on a ~80 ms image); a photo's
#: tiles' maps (hundreds of MB) are dropped, so that an idle process does not hold them
KEEP_SCRATCH_BYTES = 64 * MB


def drop_large_scratch(model: nn.Module, attribute: str) -> None:
    """Set `model.<attribute>` (a scratch holder with `nbytes()`) to None when it holds more than
    KEEP_SCRATCH_BYTES."""
    held = getattr(model, attribute, None)
    if held is not None and held.nbytes() > KEEP_SCRATCH_BYTES:
        setattr(model, attribute, None)


class Architecture:
    """One model family: how to build it, how the official test procedure runs it, what its weights say of its shape."""

    family: str = ""
    #: the variants this family builds (registry `variant` values), e.g. ("agdn", "agdn-s")
    variants: tuple[str, ...] = ()
    #: minimum LR side the raw network accepts (the engine pads smaller inputs up to it)
    min_size: int = 1
    #: the tile side of an official procedure that runs the network over tiles (ASID's 64), None for a
    #: whole-image procedure: the engine batches such tiles (`reference_forward`'s `tiles_per_forward`)
    reference_tile: int | None = None

    def build(self, variant: str, scale: int, hparams: Mapping[str, Any]) -> nn.Module:
        """A network in eval mode with random weights, shaped like the official one for this variant."""
        raise NotImplementedError

    def reference_forward(self, model: nn.Module, lr: torch.Tensor, tiles_per_forward: int = 1) -> torch.Tensor:
        """The family's official test-time procedure (padding, tiling, TLC) on a [0, 1] batch.

        `tiles_per_forward`: for a procedure that runs the network over tiles (ASID), how many tiles one forward
        call may take (the engine sizes it to the memory budget); the result does not depend on it beyond
        rounding.

        Returns the [0, 1]-scaled output, unclamped. This is what `upscale eval --protocol reference` runs
        and what the `sr_protocol` golden tensors hold.
        """
        return model(lr)

    def tiling_spec(self, model: nn.Module) -> "TilingSpec":
        """How the tiled engine cuts images for this model (the one place a family declares it; a method, as
        it may depend on the variant: ESC's window size, AGDN's TLC window)."""
        raise NotImplementedError

    def memory_estimate(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> MemoryEstimate:
        """Peak memory of `model(x)` on `device` in `dtype` (float32, or the half type under autocast). The default
        is a cautious guess for a family that has not measured its own."""
        return MemoryEstimate(64 * MB, 16 * KB)

    def local_forward(self, model: nn.Module, x: torch.Tensor, placement: Placement) -> torch.Tensor:
        """The local-statistics forward of one tile (or of the whole image, with offset (0, 0))."""
        return model(x)

    def straight_twin(self, model: nn.Module) -> nn.Module | None:
        """The same network with the same weights on its straight path (the official operation order, module
        by module), for `upscale bench` to time beside the default one; None when the family has one path."""
        return None

    def fast_path_status(self, model: nn.Module, device: torch.device) -> str | None:
        """One line on what the default path runs on here (e.g. fused CPU kernels, or why not); None when the
        family has nothing to say."""
        return None

    def release_scratch(self, model: nn.Module) -> None:
        """Drop the scratch maps a fast path keeps from one forward call to the next (`kernels.BufferPool`, on
        the model as `_scratch`) when they are large: the engine calls it when a run ends (see
        `drop_large_scratch`)."""
        drop_large_scratch(model, "_scratch")

    def warm_up(self, model: nn.Module, device: torch.device, say) -> None:
        """One-time work before any image is timed (compiling kernels); `say(line)` announces anything slow."""

    def device_warning(self, model: nn.Module, device: torch.device) -> str | None:
        """One line the user should see once when `model` runs on `device` with a faster path unavailable there
        (e.g. a missing compiler); None when there is nothing to say."""
        return None

    def describe(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[int, dict[str, Any]] | None:
        """(scale, structural hyper-parameters) read off a state dict of this family, or None if it is not one.

        The hyper-parameters are named as in `weights.toml`; the registry, not the family, matches them to a
        zoo entry (`registry.match`)."""
        return None


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for `device_type` in this thread."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def plain_inference(module: nn.Module, x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Whether `module(x)` is plain inference, which a family's fast path may take: a 4-D batch of one of
    `dtypes`, no autocast, nothing that autograd records (those run the straight modules)."""
    if x.dim() != 4 or x.dtype not in dtypes or autocast_on(x.device.type):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())))


def straight_twin(model: nn.Module) -> nn.Module:
    """The same network, sharing its parameters (nothing is copied), with its fast path off (`fast_path =
    False`): what `Architecture.straight_twin` gives for ESC and ASID."""
    twin = type(model).__new__(type(model))
    twin.__dict__ = dict(model.__dict__)
    for cache in ("_fast_cache", "_scratch"):  # the fast path's own state stays with the model
        twin.__dict__.pop(cache, None)
    twin.fast_path = False
    return twin


class KernelFastPath:
    """What a family whose models run the fused CPU kernels by default (`fast_path` on the model: ESC, ASID)
    answers for them: the straight twin, the kernels' build before timing, and the fast path's status."""

    def straight_twin(self, model: nn.Module) -> nn.Module | None:
        return straight_twin(model)

    def warm_up(self, model: nn.Module, device: torch.device, say) -> None:
        if torch.device(device).type == "cpu" and getattr(model, "fast_path", False):
            kernels.load(announce=say)

    def fast_path_status(self, model: nn.Module, device: torch.device) -> str | None:
        if torch.device(device).type != "cpu" or not getattr(model, "fast_path", False):
            return None
        return kernels.status()
