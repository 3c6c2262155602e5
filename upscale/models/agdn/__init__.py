"""AGDN and AGDN-S (Wang et al., CVPRW 2024): the family object the rest of `upscale` talks to.

- `network.py`: the straight network, module by module in the official operation order (the reference);
- `fast.py`: the same function rearranged for CPU speed in eager PyTorch;
- `fused.py`: the fast path on the fused CPU kernels, built from `kernels/cpu_kernels.cpp`;
- `model.py`: `AGDN`, the network that inference runs, choosing among the three.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from .. import kernels
from ..base import KB, MB, Architecture, MemoryEstimate, TilingSpec, drop_large_scratch
from .model import AGDN
from .network import MVSA_STRIDE, StraightAGDN


class AGDNArchitecture(Architecture):
    family = "agdn"
    variants = ("agdn", "agdn-s")
    min_size = 15  # below this the reflect pad of MVSA's smallest map fails (§4.1)

    def tiling_spec(self, model):
        # context of one TLC window on each inner edge: every window that touches a tile's core is then
        # complete inside the tile (measured on Set14 barbara x2, tile 64: halo 24 -> 49 dB vs the whole
        # image, -0.07 dB; halo 48 -> 61 dB, +0.02 dB)
        halo = -(-(model.tlc_window or 48) // MVSA_STRIDE) * MVSA_STRIDE
        return TilingSpec("placement", alignment=MVSA_STRIDE, halo=halo, batched_placements=True)

    def build(self, variant: str, scale: int, hparams: Mapping[str, Any]) -> nn.Module:
        model = AGDN(scale, hparams["num_feat"], hparams["num_block"], hparams.get("tlc_window"),
                     fast=hparams.get("fast", True))
        return model.eval()

    def memory_estimate(self, model, device, dtype):
        # measured on the CPU (tests/test_memory.py), x4, 128x96 -> 256x192, per pixel: 4.5 KB on the eager
        # fast path (CPU without the kernels), 6.6 KB on the straight modules (what runs off the CPU and under
        # autocast: 5.5 KB with bf16); the fused kernels, whole-image forward with its float output, x4 / x2:
        # 1.05 / 0.88 KB at 256x192, 0.85 / 0.83 KB at 512x384, 0.95 / 0.78 KB at 960x523 (a photo's tile): four
        # C-wide maps (blocks run in place, v in the map RCCA left free, MVSA's conv_f output and stride-2 maps in
        # the one RCCA writes after it: `_kernel_block`), the input's copies, and the output's 12 s^2 bytes,
        # estimated with a fifth more
        if torch.device(device).type != "cpu" or dtype != torch.float32 or not getattr(model, "fast", False):
            return MemoryEstimate(32 * MB, 8 * KB)
        if getattr(model, "use_kernels", False) and kernels.load() is not None:
            return MemoryEstimate(16 * MB, int(1.2 * (720 + 12 * model.scale**2)))
        return MemoryEstimate(32 * MB, 6 * KB)

    def local_forward(self, model, x, placement):
        return model(x, placement)

    def release_scratch(self, model):
        drop_large_scratch(model, "_workspace")  # the fused path's maps, grown to the largest tile of the run

    def straight_twin(self, model):
        twin = StraightAGDN(model.scale, model.fea_conv.out_channels, model.num_block, model.tlc_window)
        twin.load_state_dict(model.state_dict(), strict=True)
        return twin.to(model.fea_conv.weight.device).eval().requires_grad_(False)

    def warm_up(self, model, device, say):
        if torch.device(device).type == "cpu" and getattr(model, "fast", False) and model.use_kernels:
            kernels.load(announce=say)

    def fast_path_status(self, model, device):
        if torch.device(device).type != "cpu" or not (model.fast and model.use_kernels):
            return None
        return kernels.status()

    def describe(self, state_dict):
        if "fea_conv.weight" not in state_dict or "upsampler.0.weight" not in state_dict:
            return None
        blocks = sum(1 for k in state_dict if k.endswith(".ea.restormer_attn.temperature"))
        outputs = state_dict["upsampler.0.weight"].shape[0]
        scale = math.isqrt(outputs // 3)
        if 3 * scale * scale != outputs:
            return None
        return scale, {"num_feat": state_dict["fea_conv.weight"].shape[0], "num_block": blocks}


ARCHITECTURE = AGDNArchitecture()
