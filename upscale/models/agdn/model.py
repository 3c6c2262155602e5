"""AGDN as inference runs it: the straight network with its two fast paths in front, and their caches."""

from __future__ import annotations

import torch

from .. import kernels
from ..base import Placement, plain_inference
from .fast import _fast_forward, _Workspace
from .fused import _kernel_forward
from .network import StraightAGDN, per_placement


class AGDN(StraightAGDN):
    """The network as inference runs it: the straight modules (`StraightAGDN`, whose weights and state-dict
    keys it has), with the fast path (`fast.py`) and the fused-kernel path (`fused.py`) in front, and their
    caches."""

    def __init__(self, scale: int, num_feat: int = 42, num_block: int = 7, tlc_window: int | None = 48,
                 fast: bool = True):
        super().__init__(scale, num_feat, num_block, tlc_window)
        #: inference takes the fast path (`fast.py`) unless False: then the straight reference
        #: implementation, which follows the official operation order module by module
        self.fast = fast
        #: on the CPU in float32, the fast path runs on the fused kernels (`kernels/`) when they can be
        #: built (False: the eager PyTorch version of the fast path, which computes the same values)
        self.use_kernels = True
        self._fast_cache: tuple | None = None  # folded weights, rebuilt when a parameter changes
        self._workspace: _Workspace | None = None  # the fused-kernel path's scratch (grown to the largest input, dropped by release_scratch)
        self._module_list: list | None = None  # every submodule, for `_fast_weights`' cache key
        #: TLC windows gathered in a few calls (None: off the CPU; see `forward`)
        self.gathered_windows: bool | None = None
        self.register_load_state_dict_post_hook(_clear_fast_cache)

    def uses_fast_path(self, x: torch.Tensor, fast: bool | None = None) -> bool:
        """Whether `forward` takes the fast path for this input: on unless disabled, and only for float32 /
        float64 inference (nothing that autograd records, no autocast: those run the straight path)."""
        return bool(self.fast if fast is None else fast) and plain_inference(self, x, (torch.float32, torch.float64))

    def forward(self, x, placement: Placement | None = None, fast: bool | None = None):
        """As `StraightAGDN.forward`; `fast`: None follows `self.fast` (default True); False forces the straight
        reference path, which follows the official operation order one module at a time.

        Which path runs: on the CPU, the fused kernels (float32), else the eager fast path; on other devices
        (or under autocast, or with `fast` False) the straight modules, with the TLC windows gathered
        (`SparseAttention.gathered_windows`) off the CPU: the fast paths' per-cell loops are made for a
        CPU's caches and would be launch-bound on a GPU. `gathered_windows` True/False forces the choice."""
        on_cpu = x.device.type == "cpu"
        if on_cpu and self.uses_fast_path(x, fast):
            if isinstance(placement, (list, tuple)):  # batched tiles: the CPU paths take one placement a call
                return per_placement(lambda t, p: self(t, p, fast), x, placement)
            if self.use_kernels and x.dtype == torch.float32:
                if (ops := kernels.load()) is not None:
                    return _kernel_forward(self, ops, x, placement)
            return _fast_forward(self, x, placement)
        gathered = (not on_cpu) if self.gathered_windows is None else self.gathered_windows
        if fast is False:
            gathered = False  # the reference, as written
        for i in range(1, self.num_block + 1):
            getattr(self, f"B{i}").ea.restormer_attn.gathered_windows = gathered
        return super().forward(x, placement)


def _clear_fast_cache(module, incompatible_keys) -> None:
    module._fast_cache = None
    module._module_list = None
