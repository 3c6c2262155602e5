"""AGDN and AGDN-S (Wang et al., CVPRW 2024), the straight network, written from `shared/arch/agdn.md`.

Official state-dict key names throughout, so `params_ema` of the official checkpoints loads strictly; the
modules follow the official operation order. Section numbers in comments refer to the spec. The fast paths
(`fast.py`, `fused.py`) compute the same function from these modules' weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Placement
from ..layers import bilinear_at, box_mean

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
            size = z.shape[-2:]
            u1 = per_placement(lambda g, p: _resize_as_whole_image(g, size, p, 5), g1, placement)
            u2 = per_placement(lambda g, p: _resize_as_whole_image(g, size, p, 7), g2, placement)
        mask = torch.sigmoid(self.conv4(u1 + u2 + self.conv_f(a)))
        return z * mask + z


def per_placement(fn, t: torch.Tensor, placement):
    """fn(t, placement); for a list of placements (batched tiles, each with its own), sample group by sample
    group: the batch holds len(placement) equal groups of rows, in order."""
    if not isinstance(placement, (list, tuple)):
        return fn(t, placement)
    rows = t.shape[0] // len(placement)
    return torch.cat([fn(t[i * rows : (i + 1) * rows], p) for i, p in enumerate(placement)])


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


def disjoint_groups(spans: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """The spans of one axis in groups of equal length whose members do not overlap (a TLC axis needs two or
    three: neighbouring windows overlap, every other one does not), each group in order."""
    groups: list[list[tuple[int, int]]] = []
    for a, b in sorted(spans):
        home = next((g for g in groups if g[-1][1] <= a and g[-1][1] - g[-1][0] == b - a), None)
        if home is None:
            groups.append([(a, b)])
        else:
            home.append((a, b))
    return groups


class SparseAttention(nn.Module):
    """Channel attention with ReLU instead of softmax (§4.3), global or over the TLC window grid (§6)."""

    #: TLC windows gathered by index, a group of non-overlapping equal windows per call, and added back the
    #: same way, instead of a Python loop over windows (about 1,000 windows per block at 1080p: launch-bound
    #: on a GPU). The same function up to the order of float additions; `AGDN` turns it on off the CPU. The
    #: loop (False) is the reference.
    gathered_windows: bool = False

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
        canvas = self._gathered if self.gathered_windows else self._window_loop
        return self.project_out(per_placement(lambda t, p: canvas(t, x.dtype, p), qkv, placement))

    def _window_loop(self, qkv: torch.Tensor, dtype: torch.dtype, placement: Placement | None) -> torch.Tensor:
        """The uniform average of the TLC windows' attention outputs, window by window (the reference)."""
        n, c3, h, w = qkv.shape
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
        canvas = qkv.new_zeros(n, c3 // 3, h, w, dtype=dtype)
        count = qkv.new_zeros(1, 1, h, w, dtype=dtype)
        for i, (t, b, l, r) in enumerate(boxes):
            canvas[:, :, t:b, l:r] += outputs[i]
            count[:, :, t:b, l:r] += 1
        return canvas / count

    def _gathered(self, qkv: torch.Tensor, dtype: torch.dtype, placement: Placement | None) -> torch.Tensor:
        """The averaged canvas of the TLC windows (as the loop in `forward` builds it) in a few calls per group
        of non-overlapping windows: gather, attention, add back. Deterministic: no index is added twice in one
        call (no atomics on a GPU)."""
        n, c3, h, w = qkv.shape
        c = c3 // 3
        rows, cols = self._spans(h, w, placement)
        canvas = qkv.new_zeros(n, c, h, w, dtype=dtype)

        def index(group):
            return torch.tensor([i for a, b in group for i in range(a, b)], device=qkv.device)

        for row_group in disjoint_groups(rows):
            ri, nr, kh = index(row_group), len(row_group), row_group[0][1] - row_group[0][0]
            for col_group in disjoint_groups(cols):
                ci, nc, kw = index(col_group), len(col_group), col_group[0][1] - col_group[0][0]
                windows = qkv.index_select(2, ri).index_select(3, ci).view(n, c3, nr, kh, nc, kw)
                out = self._core(windows.permute(0, 2, 4, 1, 3, 5))  # (n, nr, nc, C, kh, kw)
                out = out.permute(0, 3, 1, 4, 2, 5).reshape(n, c, nr * kh, nc * kw)
                canvas[:, :, ri[:, None], ci[None, :]] += out.to(dtype)
        # windows are every (row span, column span) pair, so the number covering a pixel is separable
        row_count, col_count = torch.zeros(h), torch.zeros(w)  # on the host: no tiny device calls
        for a, b in rows:
            row_count[a:b] += 1
        for a, b in cols:
            col_count[a:b] += 1
        count = (row_count[:, None] * col_count[None, :]).to(qkv.device, dtype)
        return canvas / count


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


class StraightAGDN(nn.Module):
    """AGDN (C=42, 7 blocks, TLC window 48) and AGDN-S (C=24, 4 blocks, window 96), module by module in the
    official operation order.

    `tlc_window=None` makes the attention global over the whole input (the official train-mode behaviour);
    an integer runs the official TLC window grid, which is what the published numbers use.
    """

    def __init__(self, scale: int, num_feat: int = 42, num_block: int = 7, tlc_window: int | None = 48):
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

    def forward(self, x, placement: Placement | None = None):
        """`placement` None: the official computation. Given: local-statistics mode for tiles (RCCA over a
        49 px neighbourhood; TLC windows and MVSA's resize in the whole image's coordinates)."""
        mean = self.rgb_mean.to(x.dtype)
        f0 = self.fea_conv(x - mean)
        feats, f = [], f0
        for i in range(1, self.num_block + 1):
            f = getattr(self, f"B{i}")(f, placement)
            feats.append(f)
        t = self.c2(F.gelu(self.c1(torch.cat(feats, dim=1)))) + f0
        return self.upsampler(t) + mean
