"""Building blocks shared by several families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def box_mean(t: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over a size x size window centred on each pixel, clipped at the map's border (cumulative sums).

    The local replacement of a global mean (TLC): O(1) per pixel whatever the window size.
    """
    *lead, h, w = t.shape
    r = size // 2
    acc = t.double() if t.dtype == torch.float32 else t.float()  # cumulative sums lose precision in float32
    cs = F.pad(acc, (1, 0, 1, 0)).cumsum(-2).cumsum(-1)
    ys, xs = torch.arange(h, device=t.device), torch.arange(w, device=t.device)
    y0, y1 = (ys - r).clamp(0, h), (ys + r + 1).clamp(0, h)
    x0, x1 = (xs - r).clamp(0, w), (xs + r + 1).clamp(0, w)
    rows_hi, rows_lo = cs[..., y1, :], cs[..., y0, :]
    total = rows_hi[..., x1] - rows_lo[..., x1] - rows_hi[..., x0] + rows_lo[..., x0]
    count = ((y1 - y0)[:, None] * (x1 - x0)[None, :]).to(acc.dtype)
    return (total / count).to(t.dtype)


def bilinear_at(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of (..., h, w) at fractional source rows x cols, PyTorch's align_corners=False rule.

    `rows`/`cols` are source coordinates (already `(dst + 0.5) * scale - 0.5`); negatives clamp to 0 and the
    upper neighbour clamps to the last index, exactly as `F.interpolate` does, so passing the coordinates it
    would compute reproduces it; passing absolute-image coordinates shifted to a tile reproduces the whole
    image's resize inside the tile.
    """

    def axis(src: torch.Tensor, n: int):
        src = src.clamp(min=0)
        i0 = src.floor().long().clamp(max=n - 1)
        i1 = (i0 + 1).clamp(max=n - 1)
        frac = (src - i0).clamp(0, 1).to(t.dtype)
        return i0, i1, frac

    h, w = t.shape[-2:]
    r0, r1, fr = axis(rows, h)
    c0, c1, fc = axis(cols, w)
    top = t[..., r0, :] * (1 - fr)[:, None] + t[..., r1, :] * fr[:, None]
    return top[..., c0] * (1 - fc) + top[..., c1] * fc


def _mirror_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Source indices of a mirror ("reflect", edge not repeated) extension of a length-n axis.

    Identical to PyTorch's reflect padding while the pad is smaller than n; beyond that the mirror is repeated
    (the sequence is periodic with period 2(n-1)), which is what applying reflect padding again and again until
    the axis is long enough gives. A length-1 axis is replicated.
    """
    pos = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(pos)
    period = 2 * (n - 1)
    pos = torch.remainder(pos, period)
    return torch.where(pos >= n, period - pos, pos)


def mirror_pad(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """Reflect padding of the last two axes that also works when a pad is >= the axis size.

    Uses `F.pad(mode="reflect")` whenever PyTorch accepts the pad (bit-identical there), else repeated mirroring
    (see `_mirror_index`).
    """
    if left == right == top == bottom == 0:
        return x
    h, w = x.shape[-2:]
    if max(top, bottom) < h and max(left, right) < w:
        return F.pad(x, (left, right, top, bottom), mode="reflect")
    rows = _mirror_index(h, top, bottom, x.device)
    cols = _mirror_index(w, left, right, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Mirror-pad bottom/right so that both spatial sides become multiples of `multiple`."""
    h, w = x.shape[-2:]
    return mirror_pad(x, 0, (-w) % multiple, 0, (-h) % multiple)


class LayerNorm2d(nn.Module):
    """LayerNorm of an NCHW map over its channels at each pixel (biased variance), with a per-channel affine.

    eps 1e-6 as ESC and ASID use it (AGDN's own norm uses 1e-5 and its official `body.` key layout).
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)
