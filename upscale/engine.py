"""Running a loaded network on images: device, precision, size guards and the execution protocol.

`Upscaler` is what the CLI, `upscale eval` and the Python API all call, so a test of it is a test of them.
Protocols:
- "reference": the family's official test-time procedure (`Architecture.reference_forward`): what the
  papers measured and what `upscale eval` uses by default.
- "whole": one plain forward pass of the network over the whole image.
Tiled execution with local statistics plugs in here as another protocol (see `tiling.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import Architecture, get_architecture
from .registry import ModelEntry
from .weights import load_model, resolve_weights

PROTOCOLS = ("reference", "whole")


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given ("cpu", "cuda", "cuda:1"), else CUDA when present, else the CPU."""
    if name and name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pad_to_min_size(x: torch.Tensor, min_size: int) -> torch.Tensor:
    """Extend an image smaller than the network's minimum by mirroring (replicating if too thin to mirror)."""
    h, w = x.shape[-2:]
    ph, pw = max(0, min_size - h), max(0, min_size - w)
    if not (ph or pw):
        return x
    while ph or pw:  # reflect can add at most size-1 pixels per pass
        h, w = x.shape[-2:]
        step_h, step_w = min(ph, h - 1), min(pw, w - 1)
        if step_h == 0 and step_w == 0:
            return F.pad(x, (0, pw, 0, ph), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        ph, pw = ph - step_h, pw - step_w
    return x


@dataclass
class Upscaler:
    """A network ready to run: registry entry, loaded model, device, protocol."""

    entry: ModelEntry
    model: nn.Module
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    protocol: str = "reference"

    @property
    def architecture(self) -> Architecture:
        return get_architecture(self.entry.family)

    @property
    def scale(self) -> int:
        return self.entry.scale

    @classmethod
    def load(cls, entry: ModelEntry, weights: str | None = None, device: str | None = None,
             protocol: str = "reference", offline: bool = False) -> "Upscaler":
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
        dev = pick_device(device)
        model = load_model(entry, resolve_weights(entry, weights, offline=offline)).to(dev)
        return cls(entry, model, dev, protocol)

    @torch.inference_mode()
    def run(self, lr: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) float in [0, 1] -> (N, 3, s*h, s*w) on the [0, 1] scale, unclamped, on the CPU."""
        h, w = lr.shape[-2:]
        x = pad_to_min_size(lr.to(self.device, torch.float32), self.architecture.min_size)
        if self.protocol == "reference":
            y = self.architecture.reference_forward(self.model, x)
        else:
            y = self.model(x)
        return y[..., : h * self.scale, : w * self.scale].float().cpu()

    def upscale_array(self, rgb: np.ndarray) -> np.ndarray:
        """HxWx3 float32 in [0, 1] -> (s*H)x(s*W)x3 float32, clamped to [0, 1]."""
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
        return self.run(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()
