"""AGDN and AGDN-S (Wang et al., CVPRW 2024), written from `shared/arch/agdn.md`.

Official state-dict key names throughout, so `params_ema` of the official checkpoints loads strictly.
Section numbers in comments refer to the spec.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .base import Architecture, Placement, TilingSpec
from .layers import bilinear_at, box_mean

RGB_MEAN = (0.4488, 0.4371, 0.4040)
HEADS = 3
#: MVSA's coarse maps sit on a stride-6 grid (stride-2 conv, then stride-3 pooling): tiles start on it
MVSA_STRIDE = 6
#: local-statistics window of RCCA (the LR training patch, 48 px, made odd so it centres on the pixel)
LOCAL_STATS_WINDOW = 49


class BSConv(nn.Module):
    """Blueprint-separable conv (§3): 1x1 without bias, then a reflect-padded depthwise 3x3 with bias."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.dw = nn.Conv2d(cout, cout, 3, stride, 1, groups=cout, padding_mode="reflect")

    def forward(self, x):
        return self.dw(self.pw(x))


def _local_variance(t: torch.Tensor, k: int) -> torch.Tensor:
    """Unbiased variance of every k x k window at stride 3 after a reflect pad of 1 (§4.1 `localvar`)."""
    t = F.pad(t, (1, 1, 1, 1), mode="reflect")
    n, c, h, w = t.shape
    oh, ow = (h - k) // 3 + 1, (w - k) // 3 + 1
    patches = F.unfold(t, k, stride=3).view(n, c, k * k, oh, ow)
    return patches.var(dim=2, unbiased=True)


class MVSA(nn.Module):
    """Multi-view spatial attention (§4.1): pooled and variance branches on a stride-6 grid, resized back."""

    def __init__(self, channels: int):
        super().__init__()
        f = channels // 4
        self.conv1 = nn.Conv2d(channels, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv2_1 = BSConv(f, f, stride=2)
        self.conv2_2 = BSConv(f, f, stride=2)
        self.conv2_3 = BSConv(f, f, stride=2)
        self.conv2_4 = BSConv(f, f, stride=2)
        self.conv_max_1 = BSConv(f, f)
        self.conv_max_2 = BSConv(f, f)
        self.conv3_1 = BSConv(f, f)
        self.conv3_2 = BSConv(f, f)
        self.conv4 = nn.Conv2d(f, channels, 1)

    def forward(self, z, placement: Placement | None = None):
        a = self.conv1(z)
        p1 = F.max_pool2d(self.conv2_1(a), 5, stride=3, padding=1)
        p2 = F.max_pool2d(self.conv2_2(a), 7, stride=3, padding=1)
        v3 = _local_variance(self.conv2_3(a), 7)
        v4 = _local_variance(self.conv2_4(a), 5)
        # the crossing is intentional: the k5 pool meets the k5 variance, the k7 pool the k7 variance
        g1 = self.conv3_1(F.gelu(self.conv_max_1(p1 + v4)))
        g2 = self.conv3_2(F.gelu(self.conv_max_2(p2 + v3)))
        if placement is None:
            size = z.shape[-2:]
            u1 = F.interpolate(g1, size=size, mode="bilinear", align_corners=False)
            u2 = F.interpolate(g2, size=size, mode="bilinear", align_corners=False)
        else:  # the whole image's resize, evaluated at this tile's pixels
            u1 = _resize_as_whole_image(g1, z.shape[-2:], placement, 5)
            u2 = _resize_as_whole_image(g2, z.shape[-2:], placement, 7)
        mask = torch.sigmoid(self.conv4(u1 + u2 + self.conv_f(a)))
        return z * mask + z


def _coarse_size(n: int, k: int) -> int:
    """Side of MVSA's k-branch map for an n-pixel input: stride-2 conv, then k-window pooling at stride 3."""
    return (-(-n // 2) + 2 - k) // 3 + 1


def _resize_as_whole_image(g: torch.Tensor, size, placement: Placement, k: int) -> torch.Tensor:
    """Bilinear resize of a tile's coarse map with the sampling positions of the whole image's resize."""
    (big_h, big_w), (oy, ox) = placement.image_size, placement.offset
    assert oy % MVSA_STRIDE == 0 and ox % MVSA_STRIDE == 0, "tiles must start on MVSA's stride-6 grid"

    def source(n_tile, n_image, offset):
        scale = _coarse_size(n_image, k) / n_image
        dst = torch.arange(offset, offset + n_tile, dtype=torch.float64, device=g.device)
        return ((dst + 0.5) * scale - 0.5).clamp(min=0) - offset // MVSA_STRIDE

    return bilinear_at(g, source(size[0], big_h, oy), source(size[1], big_w, ox))


class _MVSAWrapper(nn.Module):
    """Holds MVSA at `body.0` so the keys read `esa.body.0.*` as in the official checkpoints."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(MVSA(channels))

    def forward(self, z, placement: Placement | None = None):
        return self.body[0](z, placement)


class _Scale(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1, channels, 1, 1), 1e-5))


class _ContrastAttention(nn.Module):
    def __init__(self, channels: int, hidden: int = 4):
        super().__init__()
        # hidden width is 4 for every C (the official reduction argument is C // 4, used as a divisor)
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1), nn.Sigmoid()
        )

    def forward(self, t, local: bool = False):
        if local:  # TLC: statistics over the training-patch neighbourhood of each pixel
            mean = box_mean(t, LOCAL_STATS_WINDOW)
            std = (box_mean(t * t, LOCAL_STATS_WINDOW) - mean * mean).clamp(min=0).sqrt()
        else:
            mean = t.mean(dim=(2, 3), keepdim=True)
            std = (t - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()  # population std, no eps
        return self.conv_du(std + mean)


class RCCA(nn.Module):
    """Contrast channel attention with a decomposition branch (§4.2); mean/std are global per image."""

    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels)
        self.decompose = nn.Conv2d(channels, 1, 1)
        self.sigma = _Scale(channels)
        self.cca = _ContrastAttention(channels)

    def forward(self, z, placement: Placement | None = None):
        t = F.gelu(self.dwconv(z))
        x1 = self.sigma.scale * (t - F.gelu(self.decompose(t)))
        return x1 + t * self.cca(t, local=placement is not None) + z


class _LayerNormBody(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at each pixel, biased variance, eps 1e-5 (§4.3); keys `<name>.body.*`."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = _LayerNormBody(channels)

    def forward(self, x):
        mu = x.mean(dim=1, keepdim=True)
        var = (x - mu).pow(2).mean(dim=1, keepdim=True)
        w, b = self.body.weight[:, None, None], self.body.bias[:, None, None]
        return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def tlc_origins(size: int, window: int) -> list[int]:
    """Window origins along one axis for the official TLC grid (§6 step 2)."""
    k = min(size, window)
    n = -(-size // k)
    step = k if n == 1 else -(-(size - k) // (n - 1))
    origins, i = [], 0
    while i + k < size:
        origins.append(i)
        i += step
    origins.append(size - k)
    return origins


def tlc_spans(window: int | None, h: int, w: int, placement: Placement | None) -> tuple[list[tuple[int, int]], ...]:
    """TLC window extents along rows and columns of an h x w map: the whole image's grid, clipped to the tile.
    The windows are every (row span, column span) pair; without TLC (window None), one span per axis."""
    if window is None:
        return [(0, h)], [(0, w)]
    (big_h, big_w), (oy, ox) = (placement.image_size, placement.offset) if placement else ((h, w), (0, 0))

    def spans(n_tile, n_image, offset):
        k = min(n_image, window)
        clipped = [(max(o - offset, 0), min(o - offset + k, n_tile)) for o in tlc_origins(n_image, k)]
        return [(a, b) for a, b in clipped if a < b]

    return spans(h, big_h, oy), spans(w, big_w, ox)


class SparseAttention(nn.Module):
    """Channel attention with ReLU instead of softmax (§4.3), global or over the TLC window grid (§6)."""

    def __init__(self, channels: int, tlc_window: int | None):
        super().__init__()
        self.tlc_window = tlc_window
        self.temperature = nn.Parameter(torch.ones(HEADS, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(channels * 3, channels * 3, 3, 1, 1, groups=channels * 3, bias=False)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=False)

    def _core(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention on (..., 3C, h, w) maps; every leading index (image, window) is independent."""
        *lead, c3, h, w = qkv.shape
        q, k, v = qkv.reshape(*lead, 3, HEADS, c3 // (3 * HEADS), h * w).unbind(-4)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = torch.relu((q @ k.transpose(-2, -1)) * self.temperature)
        return (attn @ v).reshape(*lead, c3 // 3, h, w)

    def _spans(self, h: int, w: int, placement: Placement | None) -> tuple[list[tuple[int, int]], ...]:
        return tlc_spans(self.tlc_window, h, w, placement)

    def _windows(self, h: int, w: int, placement: Placement | None) -> list[tuple[int, int, int, int]]:
        """TLC windows (top, bottom, left, right) in this map, row-major."""
        rows, cols = self._spans(h, w, placement)
        return [(t, b, l, r) for t, b in rows for l, r in cols]

    def forward(self, x, placement: Placement | None = None):
        qkv = self.qkv_dwconv(self.qkv(x))
        if self.tlc_window is None:
            return self.project_out(self._core(qkv))
        n, _, h, w = qkv.shape
        boxes = self._windows(h, w, placement)
        outputs: dict[int, torch.Tensor] = {}
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, (t, b, l, r) in enumerate(boxes):
            by_shape.setdefault((b - t, r - l), []).append(i)
        for members in by_shape.values():  # windows of one shape run as one batch
            stacked = torch.stack([qkv[:, :, t:b, l:r] for t, b, l, r in (boxes[i] for i in members)], dim=1)
            for i, out in zip(members, self._core(stacked).unbind(1)):
                outputs[i] = out
        # uniform average of the overlapping windows, built in the working dtype
        canvas = x.new_zeros(n, x.shape[1], h, w)
        count = x.new_zeros(1, 1, h, w)
        for i, (t, b, l, r) in enumerate(boxes):
            canvas[:, :, t:b, l:r] += outputs[i]
            count[:, :, t:b, l:r] += 1
        return self.project_out(canvas / count)


class FeedForward(nn.Module):
    """Restormer gated-dconv FFN, expansion 2, no biases, exact GELU (§4.3)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = channels * 2
        self.project_in = nn.Conv2d(channels, hidden * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, 1, 1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x):
        a, b = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(a) * b)


class SGSABlock(nn.Module):
    def __init__(self, channels: int, tlc_window: int | None):
        super().__init__()
        self.norm3 = ChannelLayerNorm(channels)
        self.norm4 = ChannelLayerNorm(channels)
        self.restormer_attn = SparseAttention(channels, tlc_window)
        self.restormer_ffn = FeedForward(channels)

    def forward(self, z, placement: Placement | None = None):
        z = self.restormer_attn(self.norm3(z), placement) + z
        return self.restormer_ffn(self.norm4(z)) + z


class AGDB(nn.Module):
    """Attention guidance distillation block (§4)."""

    def __init__(self, channels: int, tlc_window: int | None):
        super().__init__()
        dc = channels // 2
        self.c1_d = nn.Conv2d(channels, dc, 1)
        self.c1_r = BSConv(channels, channels)
        self.c2_d = nn.Conv2d(channels, dc, 1)
        self.c2_r = BSConv(channels, channels)
        self.c3_d = nn.Conv2d(channels, dc, 1)
        self.c3_r = BSConv(channels, channels)
        self.c4 = nn.Conv2d(channels, dc, 3, 1, 1, groups=dc)
        self.c5 = nn.Conv2d(dc * 4, channels, 1)
        self.esa = _MVSAWrapper(channels)
        self.cca = RCCA(channels)
        self.ea = SGSABlock(channels, tlc_window)

    def forward(self, u, placement: Placement | None = None):
        d1 = F.gelu(self.c1_d(u))
        r1 = F.gelu(self.c1_r(u) + u)
        d2 = F.gelu(self.c2_d(r1))
        r2 = F.gelu(self.c2_r(r1) + r1)
        d3 = F.gelu(self.c3_d(r2))
        r3 = F.gelu(self.c3_r(r2) + r2)
        r4 = F.gelu(self.c4(r3))
        z = self.c5(torch.cat([d1, d2, d3, r4], dim=1))
        return self.ea(self.cca(self.esa(z, placement), placement), placement) + u


class AGDN(nn.Module):
    """AGDN (C=42, 7 blocks, TLC window 48) and AGDN-S (C=24, 4 blocks, window 96).

    `tlc_window=None` makes the attention global over the whole input (the official train-mode behaviour);
    an integer runs the official TLC window grid, which is what the published numbers use.
    """

    def __init__(self, scale: int, num_feat: int = 42, num_block: int = 7, tlc_window: int | None = 48,
                 fast: bool = True):
        super().__init__()
        self.scale = scale
        self.tlc_window = tlc_window
        self.register_buffer("rgb_mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.fea_conv = nn.Conv2d(3, num_feat, 3, 1, 1)
        for i in range(1, num_block + 1):
            setattr(self, f"B{i}", AGDB(num_feat, tlc_window))
        self.num_block = num_block
        self.c1 = nn.Conv2d(num_feat * num_block, num_feat, 1)
        self.c2 = BSConv(num_feat, num_feat)
        self.upsampler = nn.Sequential(nn.Conv2d(num_feat, 3 * scale * scale, 3, 1, 1), _PixelShuffle(scale))
        #: inference takes the fast path (see "fast path" below) unless False: then the straight reference
        #: implementation, which follows the official operation order module by module
        self.fast = fast
        #: on the CPU in float32, the fast path runs on the fused kernels of `upscale.kernels` when they can be
        #: built (False: the eager PyTorch version of the fast path, which computes the same values)
        self.use_kernels = True
        self._fast_cache: tuple | None = None  # folded weights, rebuilt when a parameter changes
        self._workspace: _Workspace | None = None  # the fused-kernel path's scratch for the last input size
        self._module_list: list | None = None  # every submodule, for `_fast_weights`' cache key
        self.register_load_state_dict_post_hook(_clear_fast_cache)

    def bytes_per_pixel(self, device: torch.device, dtype: torch.dtype) -> int | None:
        """Peak memory of a forward per LR input pixel on the fused-kernel path (measured ~2.8 KB at 256 x 256
        and 512 x 512 for x4, output included; 4 KB with a margin), None elsewhere (the engine's estimate)."""
        if self.fast and self.use_kernels and torch.device(device).type == "cpu" and dtype == torch.float32:
            return 4_000 if kernels.load() is not None else None
        return None

    def uses_fast_path(self, x: torch.Tensor, fast: bool | None = None) -> bool:
        """Whether `forward` takes the fast path for this input: on unless disabled, and only for float32 /
        float64 inference (nothing that autograd records, no autocast: those run the straight path)."""
        if not (self.fast if fast is None else fast) or x.dim() != 4:
            return False
        if x.dtype not in (torch.float32, torch.float64) or _autocast_on(x.device.type):
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))

    def forward(self, x, placement: Placement | None = None, fast: bool | None = None):
        """`placement` None: the official computation. Given: local-statistics mode for tiles (RCCA over a
        49 px neighbourhood; TLC windows and MVSA's resize in the whole image's coordinates).

        `fast`: None follows `self.fast` (default True); False forces the straight reference path, which
        follows the official operation order one module at a time.
        """
        if self.uses_fast_path(x, fast):
            if self.use_kernels and x.device.type == "cpu" and x.dtype == torch.float32:
                if (ops := kernels.load()) is not None:
                    return _kernel_forward(self, ops, x, placement)
            return _fast_forward(self, x, placement)
        mean = self.rgb_mean.to(x.dtype)
        f0 = self.fea_conv(x - mean)
        feats, f = [], f0
        for i in range(1, self.num_block + 1):
            f = getattr(self, f"B{i}")(f, placement)
            feats.append(f)
        t = self.c2(F.gelu(self.c1(torch.cat(feats, dim=1)))) + f0
        return self.upsampler(t) + mean


class _PixelShuffle(nn.PixelShuffle):
    """`nn.PixelShuffle` that also takes a channels-last input without the slow strided path (same values:
    pure data movement) and always returns a contiguous NCHW tensor."""

    def forward(self, x):
        s = self.upscale_factor
        if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return F.pixel_shuffle(x, s)
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).view(n, h, w, c // (s * s), s, s)  # channel c*s*s + i*s + j
        return rows.permute(0, 3, 1, 4, 2, 5).reshape(n, c // (s * s), h * s, w * s)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _clear_fast_cache(module, incompatible_keys) -> None:
    module._fast_cache = None
    module._module_list = None


# ----------------------------------------------------------------------------------------------- fast path
#
# The same function as the straight modules above, rearranged for CPU speed (exact algebra; only float
# rounding differs, ~1e-6 at the output). Activations live as (pixels, channels) matrices, i.e. NHWC
# ("channels last"): 1x1 convs are plain GEMMs (`addmm`, which also take either orientation, so a layout
# change at a 1x1 conv is free), depthwise convs run on channels-last 4-D views (oneDNN's NHWC depthwise
# is 7-14x faster than its NCHW one here), and elementwise work runs on contiguous tensors, in place.
# Changes against the straight path:
# - MVSA: conv1 folded into conv_f and into the four stride-2 BSConv pointwise convs (two GEMMs from z);
#   the four stride-2 depthwise convs run as one; the local variance is avg-pooling of t and t^2 in
#   float64 with the k^2/(k^2-1) correction instead of unfold + var.
# - c4 (grouped 3x3, 2 inputs per output) = depthwise 3x3 + a 0/1 pair-sum GEMM that also adds the bias.
# - d1..d3 and r4 are written straight into the channel-major buffer that c5 reads (no torch.cat); the
#   block outputs likewise into one buffer that c1 reads.
# - RCCA: x1 + x2 + z = z + t*(sigma + w) - sigma*GELU(decompose(t)) (two fused multiply-adds).
# - Attention: v at a pixel is the same in every TLC window, so the averaged canvas at a pixel is
#   (mean of the A_w of the windows covering it) @ v. The map is cut into cells covered by the same windows;
#   per cell one C x C matrix (project_out @ mean A_w, block-diagonal A over the heads) multiplies v and the
#   residual is added in the same step: no per-window outputs, canvas, counts or separate project_out.
# - LayerNorm over channels = `F.layer_norm` on the (pixels, channels) rows.
# - FFN: project_in as two GEMMs so that both halves are contiguous for GELU(a) * b.
# - Scratch GEMM outputs are reused across the blocks of a forward pass (`_Workspace`).
# Measured and dropped (no gain here): row strips sized for the caches (per-call overhead of small convs and
# GEMMs ~50 us outweighs the saved memory traffic); oneDNN-fused GELU/sigmoid post-ops (torch.ops.mkldnn,
# within noise); glibc mmap/trim thresholds (within noise at 2 threads); torch.compile (compiles for many
# minutes on this CPU). `upscale bench` (`upscale/bench.py`) measures the fast path against the straight one.


def _gelu_(t: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU in place."""
    inplace = getattr(torch._C._nn, "gelu_", None)
    return inplace(t) if inplace is not None else t.copy_(F.gelu(t))


def _nhwc(rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(n*h*w, c) rows -> (n, c, h, w) channels-last view."""
    return rows.view(n, h, w, rows.shape[-1]).permute(0, 3, 1, 2)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(n, c, h, w) -> (n*h*w, c) rows (a view for a channels-last tensor)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _dw(rows: torch.Tensor, n: int, h: int, w: int, weight, bias=None, reflect: bool = False, stride: int = 1):
    """Depthwise 3x3 on (pixels, channels) rows: a channels-last map; zero padding, or reflect as in BSConv."""
    x = _nhwc(rows, n, h, w)
    if reflect:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias, stride, 0, 1, weight.shape[0])
    return F.conv2d(x, weight, bias, stride, 1, 1, weight.shape[0])


class _Workspace:
    """Scratch matrices reused across the blocks of one forward pass (warm memory instead of fresh pages)."""

    def __init__(self, like: torch.Tensor):
        self.like = like
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, rows: int, cols: int) -> torch.Tensor:
        """A (rows, cols) matrix in the buffer `name`; names whose contents are never live at the same time may
        share a buffer (the fused-kernel path does: a smaller working set stays in the caches)."""
        t = self.buffers.get(name)
        if t is None or t.numel() < rows * cols:
            t = self.buffers[name] = self.like.new_empty(rows * cols)
        return t[: rows * cols].view(rows, cols)


def _local_variance_fast(t: torch.Tensor, k: int) -> torch.Tensor:
    """`_local_variance` via window means of t and t^2 in float64 (no cancellation at these magnitudes)."""
    t = F.pad(t.double(), (1, 1, 1, 1), mode="reflect")
    mean = F.avg_pool2d(t, k, 3)
    mean_sq = F.avg_pool2d(t * t, k, 3)
    return (mean_sq - mean * mean) * (k * k / (k * k - 1))


def _mat(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().flatten(1).double()


def _fold_block(b: "AGDB", dtype) -> dict[str, torch.Tensor]:
    """The block's weights rearranged for the fast path (folds computed in float64)."""
    c = b.c5.out_channels
    dc = c // 2
    m = b.esa.body[0]
    out: dict[str, Any] = {}
    for k in (1, 2, 3):
        d, r = getattr(b, f"c{k}_d"), getattr(b, f"c{k}_r")
        out[f"d{k}_w"], out[f"d{k}_b"] = _mat(d), d.bias.detach().double()[:, None]
        out[f"r{k}_wt"] = _mat(r.pw).t()
        out[f"r{k}_dw"], out[f"r{k}_dwb"] = r.dw.weight.detach(), r.dw.bias.detach()
    out["c4_dw"] = b.c4.weight.detach().reshape(c, 1, 3, 3)  # input channel 2j+i of output j: weight [j, i]
    pair = torch.zeros(dc, c, dtype=torch.float64)
    pair[torch.arange(dc), 2 * torch.arange(dc)] = 1
    pair[torch.arange(dc), 2 * torch.arange(dc) + 1] = 1
    out["c4_pair"], out["c4_b"] = pair, b.c4.bias.detach().double()[:, None]
    out["c5_wt"], out["c5_b"] = _mat(b.c5).t(), b.c5.bias.detach()
    # MVSA: a = conv1(z) only feeds conv_f and the four stride-2 pointwise convs -> fold conv1 into them
    w1, b1 = _mat(m.conv1), m.conv1.bias.detach().double()
    wf, bf = _mat(m.conv_f), m.conv_f.bias.detach().double()
    out["cf_wt"], out["cf_b"] = (wf @ w1).t(), wf @ b1 + bf
    pws = [_mat(getattr(m, f"conv2_{i}").pw) for i in (1, 2, 3, 4)]
    out["s2_wt"] = torch.cat([p @ w1 for p in pws]).t()
    out["s2_b"] = torch.cat([p @ b1 for p in pws])
    out["s2_dw"] = torch.cat([getattr(m, f"conv2_{i}").dw.weight.detach() for i in (1, 2, 3, 4)])
    out["s2_dwb"] = torch.cat([getattr(m, f"conv2_{i}").dw.bias.detach() for i in (1, 2, 3, 4)])
    out["c4m_wt"], out["c4m_b"] = _mat(m.conv4).t(), m.conv4.bias.detach()
    # RCCA
    out["cca_dw"], out["cca_dwb"] = b.cca.dwconv.weight.detach(), b.cca.dwconv.bias.detach()
    out["dec_w"], out["dec_b"] = b.cca.decompose.weight.detach().flatten(), b.cca.decompose.bias.detach()
    out["sigma"] = b.cca.sigma.scale.detach().flatten()
    # attention + FFN
    ea = b.ea
    at, ff = ea.restormer_attn, ea.restormer_ffn
    out["ln3_w"], out["ln3_b"] = ea.norm3.body.weight.detach(), ea.norm3.body.bias.detach()
    out["ln4_w"], out["ln4_b"] = ea.norm4.body.weight.detach(), ea.norm4.body.bias.detach()
    out["qkv_wt"], out["qkv_dw"] = _mat(at.qkv).t(), at.qkv_dwconv.weight.detach()
    head = torch.arange(c) // (c // HEADS)
    out["tau"] = at.temperature.detach().flatten().double()[head]  # per q channel (row of A)
    out["heads"] = (head[:, None] == head[None, :]).double()  # block-diagonal mask
    out["proj"] = _mat(at.project_out)
    w_in = _mat(ff.project_in)
    out["ffa_wt"], out["ffb_wt"] = w_in[: 2 * c].t(), w_in[2 * c :].t()
    out["ffa_dw"], out["ffb_dw"] = ff.dwconv.weight.detach()[: 2 * c], ff.dwconv.weight.detach()[2 * c :]
    out["ffo_wt"] = _mat(ff.project_out).t()
    keep64 = {"tau", "heads", "proj"}  # used on tiny C x C matrices in float64
    return {k: (v if k in keep64 else v.to(dtype)).contiguous() for k, v in out.items()}


def _fast_weights(model: "AGDN", x: torch.Tensor) -> dict:
    """Folded weights, cached until a parameter changes (in place, by loading, or by moving the model)."""
    # inference tensors (a model built under inference_mode) track no version; loading a state dict into the
    # model also clears the cache (hook in AGDN.__init__)
    # (the submodule list is kept between calls: `parameters()` walks the module tree, ~1 ms a forward; the
    # parameters are still read from each module, so a replaced Parameter is seen)
    if model._module_list is None:
        model._module_list = list(model.modules())
    key = (x.device, x.dtype, tuple((p.data_ptr(), -1 if p.is_inference() else p._version)
                                    for m in model._module_list for p in m._parameters.values() if p is not None))
    cache = model._fast_cache
    if cache is not None and cache[0] == key:
        return cache[1]
    with torch.no_grad():
        dtype = x.dtype
        weights = {
            "blocks": [_fold_block(getattr(model, f"B{i}"), dtype) for i in range(1, model.num_block + 1)],
            "c1_wt": _mat(model.c1).t().to(dtype).contiguous(),
            "c1_b": model.c1.bias.detach().to(dtype),
            "c2_wt": _mat(model.c2.pw).t().to(dtype).contiguous(),
            "c2_dw": model.c2.dw.weight.detach().to(dtype),
            "c2_dwb": model.c2.dw.bias.detach().to(dtype),
        }
        weights = {k: ([{kk: vv.to(x.device) for kk, vv in b.items()} for b in v] if k == "blocks" else v.to(x.device))
                   for k, v in weights.items()}
    model._fast_cache = (key, weights)
    return weights


def _fast_forward(model: "AGDN", x: torch.Tensor, placement: Placement | None) -> torch.Tensor:
    wts = _fast_weights(model, x)
    n, _, h, w = x.shape
    c = model.c1.out_channels
    mean = model.rgb_mean.to(x.dtype)
    f0 = _rows(model.fea_conv((x - mean).contiguous(memory_format=torch.channels_last)))
    feats = x.new_empty(n * h * w, c * model.num_block)  # block outputs side by side: c1's input
    ws = _Workspace(f0)
    u = f0
    for i, bw in enumerate(wts["blocks"]):
        out = feats[:, i * c : (i + 1) * c]
        _fast_block(bw, getattr(model, f"B{i + 1}"), u, out, n, h, w, placement, ws)
        u = out
    t = _gelu_(torch.addmm(wts["c1_b"], feats, wts["c1_wt"]))
    t = _rows(_dw(torch.mm(t, wts["c2_wt"], out=ws("pw", n * h * w, c)), n, h, w, wts["c2_dw"], wts["c2_dwb"],
                  reflect=True))
    t += f0
    return model.upsampler(_nhwc(t, n, h, w)) + mean


def _fast_block(bw: dict, blk: "AGDB", u: torch.Tensor, out: torch.Tensor, n: int, h: int, w: int,
                placement: Placement | None, ws: _Workspace) -> None:
    """One AGDB on (pixels, C) rows `u`; the result is written into `out` (same shape)."""
    p, c = u.shape
    dc = c // 2
    distilled = ws("distilled", 2 * c, p)  # channel-major [d1; d2; d3; r4]: c5's input, no cat
    r = u
    for k in (1, 2, 3):
        d = distilled[(k - 1) * dc : k * dc]
        _gelu_(torch.addmm(bw[f"d{k}_b"], bw[f"d{k}_w"], r.t(), out=d))
        pw = torch.mm(r, bw[f"r{k}_wt"], out=ws("pw", p, c))
        y = _rows(_dw(pw, n, h, w, bw[f"r{k}_dw"], bw[f"r{k}_dwb"], reflect=True))
        y += r
        r = _gelu_(y)
    y = _rows(_dw(r, n, h, w, bw["c4_dw"]))
    _gelu_(torch.addmm(bw["c4_b"], bw["c4_pair"], y.t(), out=distilled[3 * dc :]))
    z = torch.addmm(bw["c5_b"], distilled.t(), bw["c5_wt"])
    z = _fast_mvsa(bw, blk.esa.body[0], z, n, h, w, placement)
    z = _fast_rcca(bw, blk.cca, z, n, h, w, placement)
    z = _fast_attention(bw, blk.ea.restormer_attn, z, n, h, w, placement, ws)
    _fast_ffn(bw, z, u, out, n, h, w, ws)


def _fast_ffn(bw: dict, z: torch.Tensor, u: torch.Tensor, out: torch.Tensor, n: int, h: int, w: int,
              ws: _Workspace) -> None:
    """out = u + z + FFN(LN4(z)). (Running it in cache-sized row strips was measured slower here: the
    per-call overhead of the small convs and GEMMs outweighs the saved memory traffic.)"""
    p, c = z.shape
    y = F.layer_norm(z, (c,), bw["ln4_w"], bw["ln4_b"], 1e-5)
    a = _gelu_(_rows(_dw(torch.mm(y, bw["ffa_wt"], out=ws("ffn", p, 2 * c)), n, h, w, bw["ffa_dw"])))
    g = _rows(_dw(torch.mm(y, bw["ffb_wt"], out=ws("ffn", p, 2 * c)), n, h, w, bw["ffb_dw"]))
    a.mul_(g)
    torch.add(z, u, out=out)
    out.addmm_(a, bw["ffo_wt"])


def _fast_mvsa(bw: dict, m: MVSA, z: torch.Tensor, n: int, h: int, w: int, placement) -> torch.Tensor:
    f = bw["cf_wt"].shape[1]
    cf = torch.addmm(bw["cf_b"], z, bw["cf_wt"])  # conv_f(conv1(z))
    s2 = _dw(torch.addmm(bw["s2_b"], z, bw["s2_wt"]), n, h, w, bw["s2_dw"], bw["s2_dwb"], reflect=True, stride=2)
    s2 = s2.contiguous()  # small NCHW map: [conv2_1, conv2_2, conv2_3, conv2_4]
    p1 = F.max_pool2d(s2[:, :f], 5, stride=3, padding=1)
    p2 = F.max_pool2d(s2[:, f : 2 * f], 7, stride=3, padding=1)
    v3 = _local_variance_fast(s2[:, 2 * f : 3 * f], 7).to(z.dtype)
    v4 = _local_variance_fast(s2[:, 3 * f :], 5).to(z.dtype)
    g1 = m.conv3_1(F.gelu(m.conv_max_1(p1 + v4)))
    g2 = m.conv3_2(F.gelu(m.conv_max_2(p2 + v3)))
    if placement is None:
        cl = torch.channels_last
        u1 = F.interpolate(g1.contiguous(memory_format=cl), size=(h, w), mode="bilinear", align_corners=False)
        u2 = F.interpolate(g2.contiguous(memory_format=cl), size=(h, w), mode="bilinear", align_corners=False)
    else:
        u1 = _resize_as_whole_image(g1, (h, w), placement, 5)
        u2 = _resize_as_whole_image(g2, (h, w), placement, 7)
    s = _rows((u1 + u2).contiguous(memory_format=torch.channels_last))
    s += cf
    mask = torch.sigmoid_(torch.addmm(bw["c4m_b"], s, bw["c4m_wt"]))
    return z.addcmul_(z, mask)


def _fast_rcca(bw: dict, r: RCCA, z: torch.Tensor, n: int, h: int, w: int, placement) -> torch.Tensor:
    p, c = z.shape
    t4 = _dw(z, n, h, w, bw["cca_dw"], bw["cca_dwb"])
    t = _gelu_(_rows(t4))
    g = _gelu_(torch.addmv(bw["dec_b"], t, bw["dec_w"]))  # GELU(decompose(t)), one value per pixel
    sigma = bw["sigma"]
    if placement is None:
        tn = t.view(n, h * w, c)
        mean = tn.mean(dim=1, keepdim=True)
        std = ((tn - mean).square_().mean(dim=1, keepdim=True)).sqrt_()  # population std, two passes
        weight = r.cca.conv_du((std + mean).transpose(1, 2).unsqueeze(-1)).view(n, 1, c)
        out = torch.addcmul(z.view(n, h * w, c), tn, weight + sigma)
    else:
        weight = r.cca(t4, local=True)  # per pixel (local statistics)
        out = (z + t * sigma).view(n, h * w, c)
        out += _rows(t4 * weight).view(n, h * w, c)
    out.addcmul_(g.view(n, h * w, 1), sigma, value=-1)
    return out.view(p, c)


def _fast_attention(bw: dict, attn: SparseAttention, z: torch.Tensor, n: int, h: int, w: int,
                    placement, ws: _Workspace) -> torch.Tensor:
    """LN3, the attention (global or TLC), project_out and the residual: z + Attn(LN3(z))."""
    p, c = z.shape
    y = F.layer_norm(z, (c,), bw["ln3_w"], bw["ln3_b"], 1e-5)
    qkv = torch.mm(y, bw["qkv_wt"], out=ws("qkv", p, 3 * c))
    qkv = _dw(qkv, n, h, w, bw["qkv_dw"]).permute(0, 2, 3, 1)  # (n, h, w, 3C) contiguous
    return _attention_core(bw, attn, qkv, z, n, h, w, placement)


def _attention_core(bw: dict, attn: SparseAttention, qkv: torch.Tensor, z: torch.Tensor, n: int, h: int, w: int,
                    placement, out: torch.Tensor | None = None, ops=None, ln4_and_residual=None) -> torch.Tensor:
    """z + project_out(attention) from the (n, h, w, 3C) q|k|v map, global or on the TLC window grid; written
    into `out` (pixels, C) when given. `ops`: the fused kernels (one pass for the grams, one for the output),
    which can also write LN4 of that sum and then add a residual: `ln4_and_residual` = (LN4 output, residual)."""
    p, c = z.shape
    if ops is not None:
        ry, row_seg, cx, col_seg, to_windows, to_cells = _cell_layout(attn.tlc_window, h, w, placement)
    else:
        rows, cols = attn._spans(h, w, placement)
        (ry, rcov), (cx, ccov) = _segments(rows, h, qkv.device), _segments(cols, w, qkv.device)
        to_windows, to_cells = _cover_matrices(rcov, ccov)
    out = (torch.empty_like(z) if out is None else out).view(n, h, w, c)
    zi = z.view(n, h, w, c)
    if ops is not None:
        flat = qkv.view(p, 3 * c)
        gram = qkv.new_empty(n, len(ry), len(cx), c, c)
        sq = qkv.new_empty(n, len(ry), len(cx), 2 * c)
        ops.cell_gram(flat, n, h, w, c, row_seg, col_seg, len(ry), len(cx), gram, sq, HEADS)
        mats = qkv.new_empty(n, len(ry), len(cx), c, -(-c // _LANES) * _LANES)
        ops.cell_mats(gram, sq, to_windows, to_cells, bw["tau"], bw["proj"], HEADS, mats)  # `_cell_matrices`
        extra = () if ln4_and_residual is None else (bw["ln4_w"], bw["ln4_b"], *ln4_and_residual)
        ops.cell_apply(flat[:, 2 * c :], z, mats, n, h, w, row_seg, col_seg, len(ry), len(cx), out.view(p, c), *extra)
        return out.view(p, c)
    for i in range(n):
        # q k^T and the squared norms per cell (a cell is covered by one fixed set of windows), then per
        # window as sums over its cells: one pass over q and k, no window copies
        gram = qkv.new_empty(len(ry), len(cx), c, c)
        sq = qkv.new_empty(len(ry), len(cx), 2 * c)
        for yi, (y0, y1) in enumerate(ry):
            for xi, (x0, x1) in enumerate(cx):
                cell = qkv[i, y0:y1, x0:x1, : 2 * c]
                if x1 - x0 == w:  # whole rows: one 2-D matrix
                    flat = _as_rows(cell)
                    torch.mm(flat[:, :c].t(), flat[:, c:], out=gram[yi, xi])
                else:
                    torch.sum(torch.bmm(cell[..., :c].transpose(1, 2), cell[..., c:]), 0, out=gram[yi, xi])
                torch.sum(cell.square(), (0, 1), out=sq[yi, xi])
        cells_t = _cell_matrices(bw, gram, sq, to_windows, to_cells)
        for yi, (y0, y1) in enumerate(ry):
            for xi, (x0, x1) in enumerate(cx):
                v = qkv[i, y0:y1, x0:x1, 2 * c :]
                if x1 - x0 == w:
                    torch.addmm(zi[i, y0:y1].reshape(-1, c), _as_rows(v), cells_t[yi, xi],
                                out=out[i, y0:y1].view(-1, c))
                else:
                    torch.add(zi[i, y0:y1, x0:x1], torch.matmul(v, cells_t[yi, xi]), out=out[i, y0:y1, x0:x1])
    return out.view(p, c)


def _cell_matrices(bw: dict, gram: torch.Tensor, sq: torch.Tensor, to_windows: torch.Tensor, to_cells: torch.Tensor):
    """Per cell, the C x C matrix M with output = z + v @ M: the mean of the attention matrices of the windows
    covering the cell, project_out folded in, transposed. From the cells' q k^T (ny, nx, C, C) and squared
    norms (ny, nx, 2C): window sums are sums over cells, in float64 (as matrix products with the 0/1 cover)."""
    ny, nx, c = gram.shape[0], gram.shape[1], gram.shape[-1]
    gram_w = (to_windows @ gram.reshape(ny * nx, c * c).double()).view(-1, c, c)
    norms = (to_windows @ sq.reshape(ny * nx, 2 * c).double()).sqrt_().clamp_min_(1e-12)
    a = gram_w / (norms[:, :c, None] * norms[:, None, c:]) * bw["tau"][:, None]
    a = torch.relu_(a) * bw["heads"]  # (windows, C, C), block-diagonal over the heads
    # the averaged canvas on a cell = mean of the A of the windows covering it, applied to v
    mix = (to_cells @ a.view(-1, c * c)).view(ny, nx, c, c)
    return (bw["proj"] @ mix).transpose(-1, -2).to(gram.dtype)


def _cover_matrices(rcov: torch.Tensor, ccov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From the per-axis covers (segments x windows, 0/1): cells -> windows sums (windows, cells) and the
    per-cell mean over covering windows (cells, windows), windows and cells row-major."""
    to_windows = torch.kron(rcov, ccov).t().contiguous()
    to_cells = torch.kron(rcov / rcov.sum(1, keepdim=True), ccov / ccov.sum(1, keepdim=True))
    return to_windows, to_cells


@functools.lru_cache(maxsize=64)
def _cell_layout(tlc_window: int | None, h: int, w: int, placement):
    """The cells of an h x w map (CPU): per axis the segments and each position's segment number, and the
    cells -> windows cover matrices (`_cover_matrices`)."""
    rows, cols = tlc_spans(tlc_window, h, w, placement)
    (ry, rcov), (cx, ccov) = _segments(rows, h, "cpu"), _segments(cols, w, "cpu")
    return ry, _segment_index(ry, h), cx, _segment_index(cx, w), *_cover_matrices(rcov, ccov)


def _segment_index(segments: list[tuple[int, int]], n: int) -> torch.Tensor:
    """Segment number of every position along an axis of n."""
    index = torch.empty(n, dtype=torch.long)
    for i, (a, b) in enumerate(segments):
        index[a:b] = i
    return index


def _as_rows(v: torch.Tensor) -> torch.Tensor:
    """(h, w, c) view whose pixels are evenly strided -> (h*w, c) view without copying."""
    h, w, c = v.shape
    if v.stride(0) == w * v.stride(1):
        return v.as_strided((h * w, c), (v.stride(1), v.stride(2)))
    return v.reshape(-1, c)


def _segments(spans: list[tuple[int, int]], n: int, device) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Cut an axis at every window edge: the segments and which spans cover each (0/1, float64)."""
    edges = sorted({0, n, *(e for span in spans for e in span)})
    segments = [(a, b) for a, b in zip(edges, edges[1:]) if a < b]
    cover = torch.tensor([[float(s <= a and b <= e) for s, e in spans] for a, b in segments], dtype=torch.float64)
    if bool((cover.sum(1) == 0).any()):
        raise AssertionError("TLC windows leave pixels uncovered")
    return segments, cover.to(device)


# ------------------------------------------------------------------------------------ fused-kernel path
#
# The fast path again, on the fused CPU kernels of `upscale/kernels` (float32 CPU only; built on first use,
# else `_fast_forward` runs). Same algebra as `_fast_forward` plus these exact rearrangements:
# - a 1x1 conv that feeds a depthwise conv runs inside the depthwise kernel, a few image rows at a time
#   (`pw_dwconv`): the distillation's c{k}_d + c{k}_r (one GEMM, d_k finished in the same pass), qkv +
#   qkv_dwconv, and the FFN's project_in + dwconv + gate; their wide intermediate maps never reach memory;
# - GEMMs are written without their bias, which is added by the kernel that reads the result, or folded
#   forward (c5's bias into MVSA, exactly: every consumer of z is affine in it before MVSA's product; a bias
#   before a reflect-padded depthwise conv becomes bias * sum of its taps); GEMM weights are padded to whole
#   16-float vectors of output columns (`_pad_cols`), as the kernels' GEMM reads them;
# - c1 reads the block outputs as they come (c1 = sum over blocks of W_i F_i), no concatenated buffer;
# - RCCA's mean and std come from shifted sums in float64, computed in the pass that makes GELU(decompose(t));
#   LN3 is computed in RCCA's last pass, LN4 and the block residual in the attention's last pass;
# - MVSA's whole coarse branch is one call (`mvsa_coarse`), its resize, conv4 and mask another (`mvsa_tail`);
# - the attention's grams cover only the heads' diagonal blocks; the per-cell matrices (`_cell_matrices`, in
#   float64) are one kernel call (`cell_mats`), with project_out applied per window instead of per cell;
# - the RGB mean is added back through the upsampler conv's bias, not as a pass over the output, and the
#   pixel shuffle reads the conv's channels-last output directly (`pixel_shuffle`).
# Measured on this project's 2-core machines (AGDN x4, 128 x 128, `upscale bench`): eager fast path ~230 ms,
# this path ~80-90 ms, the straight path ~400-500 ms.

_LANES = 16  # weights padded to whole vectors of the widest SIMD the kernels use (AVX-512: 16 floats)


def _taps(dw: torch.Tensor) -> torch.Tensor:
    """(C, 1, 3, 3) depthwise weight -> (9, C + padding) tap-major, zero beyond C, as the kernels read it."""
    c = dw.shape[0]
    out = dw.new_zeros(9, -(-c // _LANES) * _LANES + _LANES)  # a vector of slack: loads may run past C
    out[:, :c] = dw.reshape(c, 9).t()
    return out.contiguous()


def _pad_cols(w: torch.Tensor) -> torch.Tensor:
    """A GEMM's weight (K, C) with zero columns up to a multiple of 16: the kernels' GEMM loads whole vectors
    of weights and stores only the real output columns."""
    cols = w.shape[1]
    out = w.new_zeros(w.shape[0], -(-cols // 16) * 16)
    out[:, :cols] = w
    return out


def _kernel_block_weights(bw: dict, blk: "AGDB") -> dict:
    f32 = torch.float32
    c = bw["c5_wt"].shape[1]
    out: dict = {}
    for k in (1, 2, 3):
        out[f"dr{k}"] = _pad_cols(torch.cat([bw[f"d{k}_w"].t(), bw[f"r{k}_wt"]], dim=1).to(f32))
        out[f"d{k}_b"] = bw[f"d{k}_b"].flatten().to(f32)
        out[f"r{k}_dw"], out[f"r{k}_dwb"] = _taps(bw[f"r{k}_dw"].float()), bw[f"r{k}_dwb"].float()
    out["c4_dw"], out["c4_b"] = _taps(bw["c4_dw"].float()), bw["c4_b"].flatten().to(f32)
    out["c5_wt"] = _pad_cols(bw["c5_wt"].to(f32))
    b5 = bw["c5_b"].double()
    cf_wt, s2_wt = bw["cf_wt"].double(), bw["s2_wt"].double()
    out["mvsa_wt"] = _pad_cols(torch.cat([cf_wt, s2_wt], dim=1).to(f32))
    out["cf_b"] = (bw["cf_b"].double() + b5 @ cf_wt).to(f32)
    s2_dw = bw["s2_dw"].double()
    s2_bias = bw["s2_b"].double() + b5 @ s2_wt  # constant per channel before a reflect-padded conv
    out["s2_dw"] = _taps(s2_dw.float())
    out["s2_dwb"] = (bw["s2_dwb"].double() + s2_bias * s2_dw.flatten(1).sum(1)).to(f32)
    w4 = bw["c4m_wt"].float()
    out["w4"] = w4.new_zeros(w4.shape[0], -(-c // _LANES) * _LANES)
    out["w4"][:, :c] = w4
    out["b4"], out["z_bias"] = bw["c4m_b"].float(), b5.to(f32)
    out["cca_dw"], out["cca_dwb"] = _taps(bw["cca_dw"].float()), bw["cca_dwb"].float()
    out["dec_w"], out["dec_b"] = bw["dec_w"].float().contiguous(), float(bw["dec_b"].item())
    out["sigma"] = bw["sigma"].float().contiguous()
    du0, du2 = blk.cca.cca.conv_du[0], blk.cca.cca.conv_du[2]
    out["du0_w"], out["du0_b"] = du0.weight.detach().flatten(1).float().contiguous(), du0.bias.detach().float()
    out["du2_w"], out["du2_b"] = du2.weight.detach().flatten(1).float().contiguous(), du2.bias.detach().float()
    for k in ("ln3_w", "ln3_b", "ln4_w", "ln4_b"):
        out[k] = bw[k].float().contiguous()
    out["qkv_wt"], out["qkv_dw"] = _pad_cols(bw["qkv_wt"].float()), _taps(bw["qkv_dw"].float())
    out["ffin_wt"] = _pad_cols(torch.cat([bw["ffa_wt"], bw["ffb_wt"]], dim=1).float())
    out["ff_dw"] = _taps(torch.cat([bw["ffa_dw"], bw["ffb_dw"]]).float())
    out["ffo_wt"] = _pad_cols(bw["ffo_wt"].float())
    for k in ("tau", "heads", "proj"):  # the attention core is shared with the fast path
        out[k] = bw[k]
    m = blk.esa.body[0]  # MVSA's coarse-branch BSConvs, as `mvsa_coarse` reads them

    def bsconv(conv: BSConv) -> list[torch.Tensor]:
        return [conv.pw.weight.detach().flatten(), conv.dw.weight.detach().flatten(), conv.dw.bias.detach()]

    out["coarse"] = torch.stack([torch.cat(bsconv(m.conv_max_1) + bsconv(m.conv3_1)),
                                 torch.cat(bsconv(m.conv_max_2) + bsconv(m.conv3_2))]).to(f32).contiguous()
    return out


def _kernel_weights(model: "AGDN", x: torch.Tensor) -> dict:
    wts = _fast_weights(model, x)
    if "kernel" not in wts:
        c = model.c1.out_channels
        wts["kernel"] = {
            "blocks": [_kernel_block_weights(b, getattr(model, f"B{i + 1}")) for i, b in enumerate(wts["blocks"])],
            "c1_wt": [_pad_cols(wts["c1_wt"][i * c : (i + 1) * c]) for i in range(model.num_block)],
            "c1_b": wts["c1_b"], "c2_wt": _pad_cols(wts["c2_wt"]),
            # fea_conv as a GEMM on 3x3 patches, rows (ky, kx, input channel) like `_patches3x3`
            "fea_wt": _pad_cols(model.fea_conv.weight.detach().permute(2, 3, 1, 0).reshape(-1, c).to(x.dtype)),
            "fea_b": model.fea_conv.bias.detach().to(x.dtype).contiguous(),
            "c2_dw": _taps(wts["c2_dw"]), "c2_dwb": wts["c2_dwb"].contiguous(),
            # the mean added back after the pixel shuffle, as the upsampler conv's bias instead: output channel
            # k comes from conv channels k*s*s .. (k+1)*s*s - 1; saves a pass over the full-size output
            "up_b": (model.upsampler[0].bias.detach().double()
                     + model.rgb_mean.double().flatten().repeat_interleave(model.scale**2)).to(x.dtype),
        }
    return wts["kernel"]


def _patches3x3(x: torch.Tensor) -> torch.Tensor:
    """(n, c, h, w) -> (n*h*w, 9c) rows of each pixel's 3x3 neighbourhood (zero padding), ordered (ky, kx, c)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)
    return torch.cat([padded[:, ky : ky + h, kx : kx + w] for ky in range(3) for kx in range(3)], -1).view(-1, 9 * c)


def _kernel_forward(model: "AGDN", ops, x: torch.Tensor, placement: Placement | None) -> torch.Tensor:
    kw = _kernel_weights(model, x)
    n, _, h, w = x.shape
    c = model.c1.out_channels
    mean = model.rgb_mean.to(x.dtype)
    # fea_conv as patches @ weights on the kernels' GEMM: PyTorch's conv for 3 input channels sums in an order
    # that depends on the thread count (an im2col GEMM split over threads), and the output must not
    f0 = x.new_empty(n * h * w, c)
    ops.gemm(_patches3x3(x - mean), kw["fea_wt"], f0, False)
    ops.bias_act(f0, kw["fea_b"], 0, f0)
    # scratch kept on the model between calls of one size: fresh multi-megabyte buffers cost a page fault
    # per 4 KiB on first touch, which was a third of the run time at 128 x 128
    ws = model._workspace if model._workspace is not None and model._workspace.like.shape == f0.shape else None
    ws = model._workspace = ws or _Workspace(f0)
    p = f0.shape[0]
    acc = ws("c1", p, c)  # c1's output, accumulated block by block
    u = f0
    for i, bw in enumerate(kw["blocks"]):
        u = _kernel_block(ops, bw, getattr(model, f"B{i + 1}"), u, n, h, w, placement, ws, ws(f"out{i % 2}", p, c))
        ops.gemm(u, kw["c1_wt"][i], acc, i > 0)
    ops.bias_act(acc, kw["c1_b"], 1, acc)
    t = torch.empty_like(f0)
    pw = ws("pw", p, c)
    ops.gemm(acc, kw["c2_wt"], pw, False)
    ops.dwconv3x3(pw, n, h, w, kw["c2_dw"], kw["c2_dwb"], 1, True, f0, 0, 0, t)
    up = model.upsampler[0]
    y = F.conv2d(_nhwc(t, n, h, w), up.weight, kw["up_b"], padding=up.padding)  # channels-last like its input
    s = model.scale
    out = y.new_empty(n, y.shape[1] // (s * s), h * s, w * s)
    ops.pixel_shuffle(_rows(y).contiguous(), n, h, w, s, out)  # contiguous: no copy for channels-last y
    return out


def _kernel_block(ops, bw: dict, blk: "AGDB", u: torch.Tensor, n: int, h: int, w: int,
                  placement: Placement | None, ws: _Workspace, out: torch.Tensor) -> torch.Tensor:
    """One AGDB on (pixels, C) rows `u`; the result goes to `out` (which must not be `u`).

    Scratch buffers are shared by stage, to keep the working set small (at 128 x 128 the separate buffers
    added up to 73 MB, more than the caches hold, and every op ran from main memory at about half speed):
    "mid" holds c5's input, then q|k|v, then the gated FFN hidden layer; "r0"/"r1" the distillation's r maps,
    then z and RCCA's t; "wide" MVSA's GEMM output."""
    p, c = u.shape
    dc = c // 2
    distilled = ws("mid", p, 2 * c)  # [d1 | d2 | d3 | r4] per pixel: c5's input
    r = u
    for k in (1, 2, 3):
        r_next = ws(f"r{k % 2}", p, c)
        # one GEMM for [c{k}_d | c{k}_r pointwise], row by row inside the kernel; r_k = GELU(dw(pw) + bias + r)
        # and d_k = GELU(c{k}_d + bias) into c5's input
        ops.pw_dwconv(r, n, h, w, bw[f"dr{k}"], dc, bw[f"r{k}_dw"], bw[f"r{k}_dwb"], True, r, 1, 0, r_next,
                      bw[f"d{k}_b"], distilled[:, (k - 1) * dc : k * dc])
        r = r_next
    ops.dwconv3x3(r, n, h, w, bw["c4_dw"], bw["c4_b"], 1, False, None, 1, 2, distilled[:, 3 * dc :])
    z = ws("r0", p, c)  # r0 is free again
    ops.gemm(distilled, bw["c5_wt"], z, False)  # c5 without its bias: folded into MVSA
    _kernel_mvsa(ops, bw, z, n, h, w, placement, ws)
    y = ws("y", p, c)
    _kernel_rcca(ops, bw, blk.cca, z, n, h, w, placement, ws, y)  # also y = LN3(z)
    qkv = ws("mid", p, 3 * c)
    ops.pw_dwconv(y, n, h, w, bw["qkv_wt"], 0, bw["qkv_dw"], None, False, None, 0, 0, qkv)  # qkv, qkv_dwconv
    # out = z + Attn + u, and y = LN4(z + Attn), in one pass
    _attention_core(bw, blk.ea.restormer_attn, qkv.view(n, h, w, 3 * c), z, n, h, w, placement, out, ops, (y, u))
    gated = ws("mid", p, 2 * c)
    # project_in, dwconv and the gate; the 4C-wide hidden map exists only as three rows per thread
    ops.pw_dwconv(y, n, h, w, bw["ffin_wt"], 0, bw["ff_dw"], None, False, None, 0, 1, gated)
    ops.gemm(gated, bw["ffo_wt"], out, True)
    return out


def _kernel_mvsa(ops, bw: dict, z: torch.Tensor, n: int, h: int, w: int, placement, ws: _Workspace) -> None:
    """MVSA in place on z (which still lacks c5's bias; the kernel adds it)."""
    f = bw["cf_b"].shape[0]
    # [conv_f | conv2_1..conv2_4 pointwise], conv1 folded in
    cs = ws("wide", z.shape[0], 5 * f)
    ops.gemm(z, bw["mvsa_wt"], cs, False)
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    s2 = z.new_empty(n * h2 * w2, 4 * f)
    ops.dwconv3x3(cs[:, f:], n, h, w, bw["s2_dw"], bw["s2_dwb"], 2, True, None, 0, 0, s2)
    # the coarse maps: pooling, local variance, two BSConvs and a GELU per branch, in one call
    g1 = z.new_empty(n, f, (h2 + 2 - 5) // 3 + 1, (w2 + 2 - 5) // 3 + 1)
    g2 = z.new_empty(n, f, (h2 + 2 - 7) // 3 + 1, (w2 + 2 - 7) // 3 + 1)
    ops.mvsa_coarse(s2, n, h2, w2, bw["coarse"], g1, g2)
    index, lam = _mvsa_sampling(h, w, (tuple(g1.shape[-2:]), tuple(g2.shape[-2:])), placement)
    ops.mvsa_tail(z, n, h, w, cs[:, :f], bw["cf_b"], g1, g2, index, lam, bw["w4"], bw["b4"], bw["z_bias"])


@functools.lru_cache(maxsize=64)
def _mvsa_sampling(h: int, w: int, sizes, placement) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear sampling of MVSA's two coarse maps back to h x w, per axis: index (2, 4, n) rows
    [y0, y1, x0, x1] and upper weights (2, 2, n) rows [ly, lx]. Whole image: PyTorch's align_corners=False
    rule in float32 as `F.interpolate` computes it; a tile: the whole image's coordinates (see
    `_resize_as_whole_image`)."""
    size = max(h, w)
    index = torch.zeros(2, 4, size, dtype=torch.long)
    lam = torch.zeros(2, 2, size, dtype=torch.float32)
    for m, (k, (mh, mw)) in enumerate(zip((5, 7), sizes)):
        for a, (n_out, n_in) in enumerate(((h, mh), (w, mw))):
            if placement is None:
                scale = np.float32(n_in) / np.float32(n_out)
                src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
                src = torch.from_numpy(src.astype(np.float64))
            else:
                big, off = placement.image_size[a], placement.offset[a]
                scale = _coarse_size(big, k) / big
                dst = torch.arange(off, off + n_out, dtype=torch.float64)
                src = ((dst + 0.5) * scale - 0.5).clamp(min=0) - off // MVSA_STRIDE
            src = src.clamp(min=0)
            i0 = src.floor().long().clamp(max=n_in - 1)
            index[m, 2 * a, :n_out] = i0
            index[m, 2 * a + 1, :n_out] = (i0 + 1).clamp(max=n_in - 1)
            lam[m, a, :n_out] = (src - i0).clamp(0, 1).float()
    return index, lam


def _kernel_rcca(ops, bw: dict, r: RCCA, z: torch.Tensor, n: int, h: int, w: int, placement,
                 ws: _Workspace, ln_out: torch.Tensor | None = None) -> None:
    """RCCA in place on z; with `ln_out`, also LN3(z) (the attention's input) in the same pass."""
    p, c = z.shape
    t = ws("r1", p, c)  # free after c4
    ops.dwconv3x3(z, n, h, w, bw["cca_dw"], bw["cca_dwb"], 1, False, None, 1, 0, t)
    g = ws("g", p, 1).view(p)
    sums = torch.empty(n, 2, c, dtype=torch.float64)
    ops.rcca_stats(t, n, bw["dec_w"], bw["dec_b"], g, sums)
    if placement is None:  # mean + std over the image, then conv_du, in one call
        weight = z.new_empty(n, c)
        ops.rcca_weight(t, sums, n, bw["du0_w"], bw["du0_b"], bw["du2_w"], bw["du2_b"], weight)
    else:  # per pixel: statistics over each pixel's neighbourhood (tiles), then conv_du
        weight = ws("rcca_w", p, c)
        ops.rcca_local_weight(t, n, h, w, LOCAL_STATS_WINDOW, bw["du0_w"], bw["du0_b"], bw["du2_w"], bw["du2_b"],
                              weight)
    if ln_out is None:
        ops.rcca_combine(z, t, g, bw["sigma"], weight, n)
    else:
        ops.rcca_combine(z, t, g, bw["sigma"], weight, n, bw["ln3_w"], bw["ln3_b"], ln_out)

class AGDNArchitecture(Architecture):
    family = "agdn"
    variants = ("agdn", "agdn-s")
    min_size = 15  # below this the reflect pad of MVSA's smallest map fails (§4.1)
    local_mode = "placement"
    tile_alignment = MVSA_STRIDE

    def tiling_spec(self, model):
        # context of one TLC window on each inner edge: every window that touches a tile's core is then
        # complete inside the tile (measured on Set14 barbara x2, tile 64: halo 24 -> 49 dB vs the whole
        # image, -0.07 dB; halo 48 -> 61 dB, +0.02 dB)
        halo = -(-(model.tlc_window or 48) // MVSA_STRIDE) * MVSA_STRIDE
        return TilingSpec("placement", MVSA_STRIDE, halo, block=0, block_overlap=0, pad_multiple=1)

    def build(self, variant: str, scale: int, hparams: Mapping[str, Any]) -> nn.Module:
        model = AGDN(scale, hparams["num_feat"], hparams["num_block"], hparams.get("tlc_window"),
                     fast=hparams.get("fast", True))
        return model.eval()

    def local_forward(self, model, x, placement):
        return model(x, placement)

    def detect(self, state_dict):
        if "fea_conv.weight" not in state_dict or "upsampler.0.weight" not in state_dict:
            return None
        blocks = sum(1 for k in state_dict if k.endswith(".ea.restormer_attn.temperature"))
        channels = state_dict["fea_conv.weight"].shape[0]
        scale = math.isqrt(state_dict["upsampler.0.weight"].shape[0] // 3)
        if (blocks, channels) == (7, 42):
            return "agdn", scale
        if (blocks, channels) == (4, 24):
            return "agdn-s", scale
        return None


ARCHITECTURE = AGDNArchitecture()
