"""The straight ASID network, module by module in the official operation order (the reference; `fast.py` is the
CPU path). ASID and ASID-d8: Efficient Attention-Sharing Information Distillation Transformer (Park, Soh, Cho,
AAAI 2025).

Written from the spec in `shared/arch/asid.md` (which follows the official code, saturnian77/ASID, built on
Omni-SR). One class, `ASID`, covers both published variants: "asid" has 3 groups, "asid-d8" has 8. The
state-dict keys are the official ones, so official checkpoints load with `strict=True`.

Structure, in short: a 3x3 input conv; group 0 (`block0`, IDSG_A) computes six attention maps (a window map and
a grid map at each of three distillation widths 36/24/12) and every later group (`block1..`, IDSG) reuses them
with its own value projections; a 3x3 output conv with a long skip; a 3x3 conv + PixelShuffle upsampler. Each
group is an information-distillation block (local conv blocks, window/grid self-attention, gated conv FFNs,
channel attention) followed by a 1x1 conv with residual and an ESA gate.

Value range and padding (handled inside so that the engine sees ASID like every other family):
- `ASID.forward_raw(x)` is the official network: input in [-1, 1], zero padding on the bottom/right to a
  multiple of 8, output cropped back and in the [-1, 1] domain, unclamped.
- `ASID.forward(x)` is the project contract: RGB in [0, 1] -> (x - 0.5) / 0.5 -> `forward_raw` ->
  (y + 1) / 2, unclamped.

Small inputs (documented behaviour, not official; sizes where the official code is defined are never touched):
- Raw network (`forward`): a side of 8 or less zero-pads to 8, which ESA's 7x7/stride-3 max-pool after its
  stride-2 conv cannot handle (the smallest working padded size is 16). Sides < `RAW_MIN_SIDE` (= 9, the
  smallest official size, which zero-pads to 16) are first padded up to 9 by *replicating* the last row/column
  (bottom/right, the sides the official zero padding uses); the official network then runs unchanged and the
  output is cropped back to scale x the original size. `forward_raw` stays the literal official network and
  raises ValueError for a side of 8 or less.
- Official tiled procedure (`ASIDArchitecture.reference_forward`): square tiles of min(64, h, w) with overlap 24
  are only defined for min(h, w) > 24 (`PROTOCOL_MIN_SIDE` = 25). Below that, each axis of 24 pixels or less
  is covered by a single tile spanning the whole axis, and a longer axis keeps the official grid with tiles of
  min(64, side) and overlap 24 (so a 200x9 image runs as 5 tiles of 64x9, and an image with both sides <= 24 is
  one tile, i.e. exactly `forward`). Sides < 9 are replicate-padded to 9 as above. Padding a short side up to
  25 instead was rejected: it replicates most of the tile and forces the official stride of 1 (176 tiles for
  200x9).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import LayerNorm2d

#: window size of the spatial attention (hard-coded 8 in the official SLA/SGA) and the padding multiple
WINDOW = 8
#: smallest LR side the raw network handles as the official code does (zero padding to 16)
RAW_MIN_SIDE = 9
#: smallest LR side for which the official tiled test procedure is defined
PROTOCOL_MIN_SIDE = 25
#: official test procedure: square tiles of min(TILE, h, w), overlapping by TILE_OVERLAP input pixels
TILE = 64
TILE_OVERLAP = 24


# ----------------------------------------------------------------------------------------------------------------
# small pieces


class _SpatialMean(nn.Module):
    """(N, C, H, W) -> (N, C): mean over the spatial axes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class _SqueezeExcite(nn.Module):
    """Channel gate: mean over H x W -> Linear d->d/4 -> SiLU -> Linear d/4->d -> sigmoid; no biases."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = int(dim / 4)
        self.gate = nn.Sequential(
            _SpatialMean(),
            nn.Linear(dim, hidden, bias=False),
            nn.SiLU(),
            nn.Linear(hidden, dim, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)[:, :, None, None]


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(x)


class _LocalBlock(nn.Module):
    """Inverted-residual conv block with expansion 1: 1x1, GELU, depthwise 3x3, GELU, SE, 1x1, plus input."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = _Residual(
            nn.Sequential(
                nn.Conv2d(dim, dim, 1),
                nn.GELU(),
                nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
                nn.GELU(),
                _SqueezeExcite(dim),
                nn.Conv2d(dim, dim, 1),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _GatedConvFFN(nn.Module):
    """1x1 d->2d, depthwise 3x3, GELU(first half) * second half, 1x1 d->d; no biases."""

    def __init__(self, dim: int):
        super().__init__()
        self.project_in = nn.Conv2d(dim, dim * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(dim * 2, dim * 2, 3, padding=1, groups=dim * 2, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1, h2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(h1) * h2)


# ----------------------------------------------------------------------------------------------------------------
# token grouping for the spatial attention


def _group_tokens(x: torch.Tensor, grid: bool) -> torch.Tensor:
    """(B, d, H, W) -> (B * H/8 * W/8, 64, d).

    Window (`grid=False`): group (i, j) holds pixels (8i + u, 8j + v). Grid (`grid=True`): group (i, j) holds
    pixels (u * H/8 + i, v * W/8 + j). Tokens are row-major over (u, v), groups row-major over (i, j).
    """
    b, d, h, w = x.shape
    nh, nw = h // WINDOW, w // WINDOW
    if grid:
        t = x.view(b, d, WINDOW, nh, WINDOW, nw).permute(0, 3, 5, 2, 4, 1)
    else:
        t = x.view(b, d, nh, WINDOW, nw, WINDOW).permute(0, 2, 4, 3, 5, 1)
    return t.reshape(b * nh * nw, WINDOW * WINDOW, d)


def _ungroup_tokens(t: torch.Tensor, shape: torch.Size, grid: bool) -> torch.Tensor:
    """Inverse of `_group_tokens`."""
    b, d, h, w = shape
    nh, nw = h // WINDOW, w // WINDOW
    t = t.view(b, nh, nw, WINDOW, WINDOW, d)
    if grid:
        x = t.permute(0, 5, 3, 1, 4, 2)  # b, d, u, i, v, j
    else:
        x = t.permute(0, 5, 1, 3, 2, 4)  # b, d, i, u, j, v
    return x.reshape(b, d, h, w)


def _relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into a (2w-1)^2 table: (du + w-1) * (2w-1) + (dv + w-1)."""
    pos = torch.arange(window)
    coords = torch.stack(torch.meshgrid(pos, pos, indexing="ij")).flatten(1)  # (2, w*w), row-major (u, v)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]


class _SelfAttentionCompute(nn.Module):
    """One-head self-attention over 64-token groups with a relative position bias; returns the softmax map."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**-0.5
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim, bias=False))
        self.rel_pos_bias = nn.Embedding((2 * WINDOW - 1) ** 2, 1)
        self.register_buffer("rel_pos_indices", _relative_position_index(WINDOW), persistent=False)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.to_qkv(z).chunk(3, dim=-1)
        q = q * self.scale
        sim = q @ k.transpose(-2, -1)
        sim = sim + self.rel_pos_bias(self.rel_pos_indices).squeeze(-1)
        attn = sim.softmax(dim=-1)
        return self.to_out(attn @ v), attn


class _SelfAttentionShared(nn.Module):
    """Applies a shared (post-softmax) attention map from group 0 to this module's own value projection."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim, bias=False))

    def forward(self, z: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return self.to_out(attn @ self.to_v(z))


class _SpatialAttentionBlock(nn.Module):
    """SLA (`grid=False`, 8x8 windows) or SGA (`grid=True`, 8x8 dilated grid), then a gated conv FFN.

    `compute=True` (group 0) computes its attention map and returns it; `compute=False` reuses a given one.
    """

    def __init__(self, dim: int, grid: bool, compute: bool):
        super().__init__()
        self.grid = grid
        self.compute = compute
        self.norm = nn.LayerNorm(dim)
        self.attn = _SelfAttentionCompute(dim) if compute else _SelfAttentionShared(dim)
        self.cnorm = LayerNorm2d(dim)
        self.gfn = _GatedConvFFN(dim)

    def forward(self, x: torch.Tensor, attn: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = _group_tokens(x, self.grid)
        if self.compute:
            y, attn = self.attn(self.norm(tokens))
        else:
            y = self.attn(self.norm(tokens), attn)
        x = _ungroup_tokens(y + tokens, x.shape, self.grid)
        x = x + self.gfn(self.cnorm(x))
        return x, attn


class _ChannelAttention(nn.Module):
    """One-head transposed (C x C) attention inside 8x8 windows (`grid=False`) or across windows (`grid=True`).

    Window mode: per window, q/k/v are (C, 64). Grid mode: per intra-window offset, q/k/v are (C, #windows).
    q and k are L2-normalised along the token axis; logits are scaled by a learned temperature.
    """

    def __init__(self, dim: int, window: int, grid: bool):
        super().__init__()
        self.window = window
        self.grid = grid
        self.temperature = nn.Parameter(torch.ones(1, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, c, h, w = t.shape
        p = self.window
        t = t.view(b, c, h // p, p, w // p, p)
        if self.grid:  # groups: offsets (u, v); tokens: windows (i, j)
            t = t.permute(0, 3, 5, 1, 2, 4).reshape(b * p * p, c, (h // p) * (w // p))
        else:  # groups: windows (i, j); tokens: offsets (u, v)
            t = t.permute(0, 2, 4, 1, 3, 5).reshape(b * (h // p) * (w // p), c, p * p)
        return t

    def _merge(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, c, h, w = shape
        p = self.window
        if self.grid:
            t = t.view(b, p, p, c, h // p, w // p).permute(0, 3, 4, 1, 5, 2)
        else:
            t = t.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return t.reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.project_out(self._merge(attn @ v, x.shape))


class _ChannelTransformer(nn.Module):
    """BlockC: window channel attention, FFN, grid channel attention, FFN; each pre-normed and residual."""

    def __init__(self, dim: int, window: int):
        super().__init__()
        self.canorm1 = LayerNorm2d(dim)
        self.cttn1 = _ChannelAttention(dim, window, grid=False)
        self.cnorm1 = LayerNorm2d(dim)
        self.gfn1 = _GatedConvFFN(dim)
        self.canorm2 = LayerNorm2d(dim)
        self.cttn2 = _ChannelAttention(dim, window, grid=True)
        self.cnorm2 = LayerNorm2d(dim)
        self.gfn2 = _GatedConvFFN(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.cttn1(self.canorm1(x))
        x = x + self.gfn1(self.cnorm1(x))
        x = x + self.cttn2(self.canorm2(x))
        x = x + self.gfn2(self.cnorm2(x))
        return x


# ----------------------------------------------------------------------------------------------------------------
# the distillation block, the groups, the network


class _IDSABlock(nn.Module):
    """Information distillation with window/grid self-attention at widths 3c, 2c, c (c = C/4), then BlockC.

    `compute=True` (group 0) returns the six attention maps (SLA1, SGA1, SLA2, SGA2, SLA3, SGA3) it computed;
    `compute=False` takes them and reuses them in the same places.
    """

    def __init__(self, dim: int, window: int, compute: bool):
        super().__init__()
        c = dim // 4
        self.split = c
        self.compute = compute
        self.LB1 = _LocalBlock(dim)
        self.LB2 = _LocalBlock(dim - c)
        self.LB3 = _LocalBlock(dim - 2 * c)
        for i, width in enumerate((dim - c, dim - 2 * c, dim - 3 * c), start=1):
            setattr(self, f"SLA{i}", _SpatialAttentionBlock(width, grid=False, compute=compute))
            setattr(self, f"SGA{i}", _SpatialAttentionBlock(width, grid=True, compute=compute))
        self.pw1 = nn.Conv2d(dim, dim, 1)
        self.pw2 = nn.Conv2d(dim - c, dim - c, 1)
        self.pw3 = nn.Conv2d(dim, dim, 1)
        self.BlockC = _ChannelTransformer(dim, window)

    def _attend(self, i: int, t: torch.Tensor, maps: list, shared) -> torch.Tensor:
        sla, sga = getattr(self, f"SLA{i}"), getattr(self, f"SGA{i}")
        if shared is None:
            t, a_local = sla(t)
            t, a_grid = sga(t)
            maps += [a_local, a_grid]
        else:
            t, _ = sla(t, shared[2 * i - 2])
            t, _ = sga(t, shared[2 * i - 1])
        return t

    def forward(self, x: torch.Tensor, shared: tuple | None = None):
        if self.compute == (shared is not None):
            raise ValueError("the computing block takes no attention maps; a reusing block needs all six")
        c = self.split
        maps: list[torch.Tensor] = []

        x = self.LB1(x)
        loc, t = x[:, :c], x[:, c:]
        t = self._attend(1, t, maps, shared)
        x = self.pw1(torch.cat((t, loc), dim=1))

        x1, t = x[:, :c], x[:, c:]
        t = self.LB2(t)
        loc, t = t[:, :c], t[:, c:]
        t = self._attend(2, t, maps, shared)
        x = self.pw2(torch.cat((t, loc), dim=1))

        x2, t = x[:, :c], x[:, c:]
        t = self.LB3(t)
        loc, t = t[:, :c], t[:, c:]
        t = self._attend(3, t, maps, shared)
        x = self.pw3(torch.cat((x1, x2, t, loc), dim=1))

        x = self.BlockC(x)
        return (x, tuple(maps)) if self.compute else x


class _ESA(nn.Module):
    """Enhanced spatial attention gate (width 16): strided conv, 7/3 max-pool, conv, bilinear up, sigmoid."""

    def __init__(self, dim: int):
        super().__init__()
        f = max(dim // 4, 16)
        self.conv1 = nn.Conv2d(dim, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = nn.Conv2d(f, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1_ = self.conv1(x)
        c1 = self.conv2(c1_)
        v = F.max_pool2d(c1, kernel_size=7, stride=3)
        c3 = self.conv3(v)
        c3 = F.interpolate(c3, size=x.shape[-2:], mode="bilinear", align_corners=False)
        cf = self.conv_f(c1_)
        return x * torch.sigmoid(self.conv4(c3 + cf))


class _Group(nn.Module):
    """IDSG_A (`compute=True`, group 0) or IDSG: IDSA block, 1x1 conv + residual, ESA."""

    def __init__(self, dim: int, window: int, compute: bool):
        super().__init__()
        self.compute = compute
        block = _IDSABlock(dim, window, compute)
        # official key layout: group 0 wraps its block in a one-element Sequential, later groups do not
        self.residual_layer = nn.Sequential(block) if compute else block
        self.res_end = nn.Conv2d(dim, dim, 1)
        self.esa = _ESA(dim)

    def forward(self, x: torch.Tensor, shared: tuple | None = None):
        if self.compute:
            t, maps = self.residual_layer[0](x)
            return self.esa(self.res_end(t) + x), maps
        t = self.residual_layer(x, shared)
        return self.esa(self.res_end(t) + x)


class ASID(nn.Module):
    """The ASID network; `groups=3` is ASID, `groups=8` is ASID-d8.

    `forward` takes RGB in [0, 1] and returns the [0, 1]-scaled output (unclamped); `forward_raw` is the
    official network on [-1, 1] input. See the module docstring for padding and small inputs.
    """

    def __init__(self, scale: int = 4, groups: int = 3, num_feat: int = 48, window_size: int = WINDOW):
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        if num_feat % 4:
            raise ValueError(f"num_feat must be divisible by 4, got {num_feat}")
        if window_size != WINDOW:
            raise ValueError(f"ASID's spatial attention is fixed to 8x8 windows; window_size={window_size}")
        self.scale = int(scale)
        self.groups = int(groups)
        self.num_feat = int(num_feat)
        self.input = nn.Conv2d(3, num_feat, 3, padding=1)
        for k in range(groups):
            setattr(self, f"block{k}", _Group(num_feat, window_size, compute=(k == 0)))
        self.output = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.up = nn.Sequential(nn.Conv2d(num_feat, 3 * self.scale**2, 3, padding=1), nn.PixelShuffle(self.scale))

    def forward_raw(self, x: torch.Tensor) -> torch.Tensor:
        """The official network: (N, 3, H, W) in [-1, 1] -> (N, 3, sH, sW) in the [-1, 1] domain, unclamped."""
        h, w = x.shape[-2:]
        f0 = self.input(self.pad_raw(x))
        y, maps = self.block0(f0)
        for k in range(1, self.groups):
            y = getattr(self, f"block{k}")(y, maps)
        return self.tail(y, f0, h, w)

    def pad_raw(self, x: torch.Tensor) -> torch.Tensor:
        """The raw network's input rule: both sides >= RAW_MIN_SIDE, zero-padded bottom/right to the window."""
        h, w = x.shape[-2:]
        if min(h, w) < RAW_MIN_SIDE:
            raise ValueError(
                f"the raw ASID network needs both sides >= {RAW_MIN_SIDE} (got {h}x{w}); "
                "use forward(), which pads small inputs"
            )
        return F.pad(x, (0, (-w) % WINDOW, 0, (-h) % WINDOW))  # zeros, bottom/right

    def tail(self, y: torch.Tensor, f0: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """From the last group's output `y` and the shallow features `f0` to the (cropped) raw output."""
        y = self.up(self.output(y) + f0)
        return y[..., : h * self.scale, : w * self.scale]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """RGB (N, 3, H, W) in [0, 1] -> (N, 3, sH, sW) on the [0, 1] scale, unclamped."""
        h, w = x.shape[-2:]
        x = pad_to_min_side(x, RAW_MIN_SIDE)
        y = self.forward_raw((x - 0.5) / 0.5)
        return (y[..., : h * self.scale, : w * self.scale] + 1) / 2


def pad_to_min_side(x: torch.Tensor, min_side: int) -> torch.Tensor:
    """Replicate-pad the bottom/right of an NCHW batch so both sides are at least `min_side` (else unchanged)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = max(0, min_side - h), max(0, min_side - w)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x
