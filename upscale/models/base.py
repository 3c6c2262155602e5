"""The contract between a model family and the rest of `upscale`.

Every family module (`agdn.py`, `esc.py`, `asid.py`) exports one `ARCHITECTURE` object, a subclass of
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

from typing import Any, Mapping

import torch
from torch import nn


class Architecture:
    """One model family: how to build it, how the official test procedure runs it, how to spot its weights."""

    family: str = ""
    #: the variants this family builds (registry `variant` values), e.g. ("agdn", "agdn-s")
    variants: tuple[str, ...] = ()
    #: minimum LR side the raw network accepts (the engine pads smaller inputs up to it)
    min_size: int = 1

    def build(self, variant: str, scale: int, hparams: Mapping[str, Any]) -> nn.Module:
        """A network in eval mode with random weights, shaped like the official one for this variant."""
        raise NotImplementedError

    def reference_forward(self, model: nn.Module, lr: torch.Tensor) -> torch.Tensor:
        """The family's official test-time procedure (padding, tiling, TLC) on a [0, 1] batch.

        Returns the [0, 1]-scaled output, unclamped. This is what `upscale eval --protocol reference` runs
        and what the `sr_protocol` golden tensors hold.
        """
        return model(lr)

    def detect(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
        """(variant, scale) if these keys and shapes belong to this family, else None."""
        return None
