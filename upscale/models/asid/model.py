"""ASID as inference runs it: the straight network (`network.py`) with the CPU path (`fast.py`) in front."""

from __future__ import annotations

import torch

from .. import kernels
from ..base import plain_inference
from . import fast, network


class ASID(network.ASID):
    __doc__ = network.ASID.__doc__

    #: inference takes the fast path where it applies (plain float32 inference on the CPU with the kernels
    #: built); False: always the straight modules, which follow the official operation order (what `upscale
    #: bench` times beside it)
    fast_path = True

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path and x.device.type == "cpu" and plain_inference(self, x):
            if (ops := kernels.load()) is not None:
                return fast.forward_raw(self, ops, x)
        return super().forward_raw(x)

