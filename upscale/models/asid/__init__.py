"""ASID and ASID-d8 (Park, Soh, Cho, AAAI 2025): the family object the rest of `upscale` talks to.

- `network.py`: the straight network, module by module in the official operation order (the reference), with
  the value range, padding and small-input rules in its docstring;
- `fast.py`: the CPU path on the fused kernels (`..kernels`), the same function rearranged for speed;
- `model.py`: `ASID` as inference runs it, the fast path in front of the straight one.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from ...tiling import tiled_forward
from ..base import KB, MB, Architecture, KernelFastPath, MemoryEstimate, TilingSpec
from .model import ASID
from .network import (
    PROTOCOL_MIN_SIDE,
    RAW_MIN_SIDE,
    TILE,
    TILE_OVERLAP,
    WINDOW,
    LayerNorm2d,
    pad_to_min_side,
)


class ASIDArchitecture(KernelFastPath, Architecture):
    family = "asid"
    variants = ("asid", "asid-d8")
    min_size = RAW_MIN_SIDE  # smaller inputs also work through model(x), which replicate-pads them itself
    reference_tile = TILE

    def tiling_spec(self, model: nn.Module) -> TilingSpec:
        # blocks of the training size on the official tiler's grid (stride 40, anchored at (0, 0)) blended
        # smoothly; stride and padding are multiples of the 8 px attention windows
        return TilingSpec("blocks", block=TILE, block_overlap=TILE_OVERLAP, pad_multiple=WINDOW)

    def memory_estimate(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> MemoryEstimate:
        # measured on the CPU (tests/test_memory.py), x4, 128x96 -> 256x192: ASID 6.7 KB per pixel in fp32,
        # 4.8 KB under bf16 autocast; ASID-d8 7.2 / 4.7 KB; about 30 MB at 64x64
        return MemoryEstimate(32 * MB, (9 if dtype == torch.float32 else 7) * KB)

    def build(self, variant: str, scale: int, hparams: Mapping[str, Any]) -> ASID:
        if variant not in self.variants:
            raise ValueError(f"unknown ASID variant {variant!r}; known: {', '.join(self.variants)}")
        if scale not in (2, 3, 4):
            raise ValueError(f"ASID has x2, x3 and x4 models, not x{scale}")
        if "groups" not in hparams:
            raise ValueError("ASID needs its number of groups (hparams 'groups', listed per variant in weights.toml)")
        model = ASID(
            scale=scale,
            groups=int(hparams["groups"]),
            num_feat=int(hparams.get("num_feat", 48)),
            window_size=int(hparams.get("window_size", WINDOW)),
        )
        return model.eval()

    def reference_forward(self, model: nn.Module, lr: torch.Tensor, tiles_per_forward: int = 1) -> torch.Tensor:
        """The official test procedure (tester_Matlab.py, patch_test=True) on a [0, 1] batch.

        x = (lr - 0.5) / 0.5; square tiles of min(64, h, w) on the official grid with 24 px overlap, each run
        through the raw network; plain average in [-1, 1]; then (y + 1) / 2. Unlike the official script the
        result is not clipped to [0, 1]. For min(h, w) <= 24, where the official procedure is undefined, see the
        module docstring (an axis <= 24 px is one full-length tile; sides < 9 are replicate-padded).
        The official script runs one tile per forward; `tiles_per_forward` stacks that many tiles into one
        batch (a 1080p image is 1,296 tiles: one per call is launch-bound on a GPU). The average is formed in
        the same order either way.
        """
        scale = model.scale
        h, w = lr.shape[-2:]
        x = pad_to_min_side(lr, RAW_MIN_SIDE)  # no-op unless a side is < 9
        ph, pw = x.shape[-2:]
        if min(ph, pw) >= PROTOCOL_MIN_SIDE:
            tile: int | tuple[int, int] = min(TILE, ph, pw)  # official: square
        else:
            tile = tuple(side if side < PROTOCOL_MIN_SIDE else min(TILE, side) for side in (ph, pw))
        with torch.no_grad():
            y = tiled_forward(model.forward_raw, (x - 0.5) / 0.5, scale, tile, TILE_OVERLAP, tiles_per_forward)
        return (y[..., : h * scale, : w * scale] + 1) / 2

    def describe(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[int, dict[str, Any]] | None:
        required = (
            "input.weight",
            "output.weight",
            "up.0.weight",
            "block0.residual_layer.0.SLA1.attn.to_qkv.weight",
            "block0.res_end.weight",
            "block0.esa.conv1.weight",
        )
        if any(key not in state_dict for key in required):
            return None
        groups = 1
        while f"block{groups}.res_end.weight" in state_dict:
            if f"block{groups}.residual_layer.SLA1.attn.to_v.weight" not in state_dict:
                return None
            groups += 1
        up = state_dict["up.0.weight"]
        if up.dim() != 4 or up.shape[0] % 3:
            return None
        scale = math.isqrt(up.shape[0] // 3)
        if 3 * scale * scale != up.shape[0]:
            return None
        return scale, {"groups": groups, "num_feat": state_dict["input.weight"].shape[0]}


ARCHITECTURE = ASIDArchitecture()

__all__ = ["ARCHITECTURE", "ASID", "ASIDArchitecture", "LayerNorm2d", "pad_to_min_side"]
