"""ESC as inference runs it: the straight networks (`network.py`) with the CPU path (`fast.py`) in front."""

from __future__ import annotations

from .. import kernels
from ..base import plain_inference
from . import fast, network


class _FastPath:
    """Takes `fast.fast_forward` for plain float32 inference on the CPU when the kernels are built; the straight
    modules otherwise (other devices, autocast, autograd, `fast_path = False`, shapes the kernels do not cover)."""

    #: inference takes the fast path where it applies; False: always the straight modules, which follow the
    #: official operation order (what `upscale bench` times beside it)
    fast_path = True

    def forward(self, x):
        if self.fast_path and x.device.type == "cpu" and plain_inference(self, x) and fast.supports(self):
            if (ops := kernels.load()) is not None:
                return fast.fast_forward(self, ops, x)
        return super().forward(x)


class ESC(_FastPath, network.ESC):
    __doc__ = network.ESC.__doc__


class ESCFP(_FastPath, network.ESCFP):
    __doc__ = network.ESCFP.__doc__


class ESCReal(_FastPath, network.ESCReal):
    __doc__ = network.ESCReal.__doc__

