"""ESC, ESC-FP and ESC-Real (Lee, Yun, Ro, ICCV 2025): the family object the rest of `upscale` talks to.

- `network.py`: the straight networks, module by module in the official operation order (the reference), the
  attention back-ends and the official test procedure (`reference_forward`);
- `fast.py`: the CPU path on the fused kernels (`..kernels`), the same function rearranged for speed;
- `model.py`: `ESC`, `ESCFP`, `ESCReal` as inference runs them, the fast path in front of the straight one.

Section numbers (§) in comments refer to the spec, `shared/arch/esc.md`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
from torch import nn

from ..base import KB, MB, Architecture, KernelFastPath, MemoryEstimate, TilingSpec
from .model import ESC, ESCFP, ESCReal
from .network import (
    BACKENDS,
    Block,
    ConvAttn,
    ConvFFN,
    LayerNorm2d,
    WindowAttention,
    _ESCBase,
    _flex_available,
    d4_symmetrize,
    mirror_pad,
    reference_forward,
    relative_position_bias,
    relative_position_index,
    resolve_backend,
    set_attn_backend,
    window_attention,
)

_CLASSES: dict[str, type[_ESCBase]] = {"ESC": ESC, "ESCFP": ESCFP, "ESCReal": ESCReal}
_DEFAULT_ARCH = {"esc-fp": "ESCFP", "esc-real": "ESCReal"}


class ESCArchitecture(KernelFastPath, Architecture):
    family = "esc"
    variants = ("esc-light", "esc", "esc-dflip", "esc-fp", "esc-xl", "esc-real")
    min_size = 1  # padding inside the network (`mirror_pad`) accepts any size

    def tiling_spec(self, model: nn.Module) -> TilingSpec:
        # blocks of 4 windows with one window of overlap: block origins (stride 3 windows) and the image padded
        # to whole windows keep every attention window on the whole image's grid; each block's pooled mean
        # (the dynamic kernels) is its local statistic
        ws = model.window_size
        return TilingSpec("blocks", alignment=ws, block=4 * ws, block_overlap=ws, pad_multiple=ws)

    def memory_estimate(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> MemoryEstimate:
        # measured on the CPU (tests/test_memory.py), x4, 128x96 -> 256x192, per pixel: ESC-light 5.0 KB in fp32,
        # 1.0 KB under bf16 autocast; ESC 4.0 / 1.1 KB; ESC-Real (wider FFN) 12.2 / 5.8 KB; ESC-XL (x2, 192
        # channels) about 4 KB per pixel above some 600 MB at 64x64 (its attention scores: 12 heads of 48x48
        # windows, chunked to _SCORE_BUDGET_BYTES)
        dim = model.dim
        half = dtype != torch.float32
        if isinstance(model, ESCReal):
            return MemoryEstimate(64 * MB, (8 if half else 14) * KB)
        per_pixel = (4 if half else 6) * KB * max(1.0, dim / 64)
        return MemoryEstimate((640 if dim > 64 else 64) * MB, int(per_pixel))

    def build(self, variant: str, scale: int, hparams: Mapping[str, Any]) -> nn.Module:
        if variant not in self.variants:
            raise ValueError(f"unknown ESC variant {variant!r}; choose one of {', '.join(self.variants)}")
        kwargs = dict(hparams)
        arch = kwargs.pop("arch", None) or _DEFAULT_ARCH.get(variant, "ESC")
        if arch not in _CLASSES:
            raise ValueError(f"unknown ESC arch {arch!r}; choose one of {', '.join(_CLASSES)}")
        return _CLASSES[arch](upscaling_factor=int(scale), **kwargs).eval()

    def reference_forward(self, model: nn.Module, lr: torch.Tensor, tiles_per_forward: int = 1) -> torch.Tensor:
        return reference_forward(model, lr)  # one pass over the whole image: nothing to batch

    def device_warning(self, model: nn.Module, device: torch.device) -> str | None:
        if torch.device(device).type == "cuda" and model.attn_backend == "auto" and not _flex_available():
            return ("ESC's window attention runs on sdpa, slower than flex_attention, which needs Triton "
                    "(pip install triton)")
        return None

    def describe(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[int, dict[str, Any]] | None:
        """ESC DIV2K and DFLIP weights look alike: both match "esc" (the first in the zoo's order)."""
        try:
            return _describe(state_dict)
        except (KeyError, ValueError, IndexError, AttributeError):
            return None


def _describe(sd: Mapping[str, torch.Tensor]) -> tuple[int, dict[str, Any]] | None:
    """(scale, hyper-parameters as weights.toml names them) read off a state dict, or None if not an ESC one."""
    if "lk_channel" in sd and "lk_spatial" in sd:
        arch, large = "ESCFP", sd["lk_spatial"]
    elif "plk_filter" in sd:
        arch, large = ("ESCReal" if "skip.0.weight" in sd else "ESC"), sd["plk_filter"]
    else:
        return None
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    convs = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.0\.pconvs\.(\d+)\.", k))}
    table = sd["blocks.0.attn.relative_position_bias"]
    dim = sd["proj.weight"].shape[0]
    hp = {
        "arch": arch,
        "dim": dim,
        "pdim": large.shape[0],
        "kernel_size": large.shape[-1],
        "n_blocks": len(blocks),
        "conv_blocks": len(convs),
        "window_size": (math.isqrt(table.shape[1]) + 1) // 2,
        "num_heads": table.shape[0],
        "exp_ratio": sd["blocks.0.convffns.0.proj.weight"].shape[0] / dim,
    }
    if arch == "ESC":  # the other two have no LayerNorm option
        hp["use_ln"] = "blocks.0.lns.0.weight" in sd
    if arch == "ESCReal":
        scale = 4
    else:
        outputs = sd["to_img.weight"].shape[0]
        scale = math.isqrt(outputs // 3)
        if 3 * scale * scale != outputs:
            return None
    return scale, hp


ARCHITECTURE = ESCArchitecture()

__all__ = [
    "ARCHITECTURE",
    "BACKENDS",
    "Block",
    "ConvAttn",
    "ConvFFN",
    "ESC",
    "ESCArchitecture",
    "ESCFP",
    "ESCReal",
    "LayerNorm2d",
    "d4_symmetrize",
    "mirror_pad",
    "reference_forward",
    "relative_position_bias",
    "relative_position_index",
    "resolve_backend",
    "set_attn_backend",
    "window_attention",
    "WindowAttention",
]
