"""ASID's CPU path on the fused kernels (`..kernels`), float32: the function of `network.py`, rearranged for speed.

The straight modules run NCHW maps through oneDNN, and ASID slices channels at every distillation step: most of
its convs then read strided maps (a 1x1 conv on a channel slice ran at 8 GMAC/s, a depthwise 3x3 at 3), and each
8x8 grouping is a permuted copy. Here the groups run on channels-last maps, (pixels, channels) matrices, the
kernels' layout, where a channel slice is a view the kernels read in place:
- every 1x1 conv is a GEMM; a 1x1 over concatenated parts (the distillation's pw1..pw3) is one GEMM per part
  into the same output, so nothing is concatenated;
- each gated FFN (1x1 -> depthwise 3x3 -> GELU(first half) * second half) and each channel attention's qkv
  (1x1 -> depthwise 3x3) is one `pw_dwconv` pass (the 1x1's output rows never reach memory);
- a local block's squeeze-excitation gate scales the rows of its last 1x1's weight (per image) instead of the map;
- the 8x8 window and grid self-attentions (64 tokens) are the `token_attention` kernel, which reads each group's
  tokens from the map and adds the result to the residual map in place (no grouped copies), and returns the
  attention map that the later groups share; the output projection is folded into v's weights;
- the channel attention runs on AGDN's cell kernels (`cell_gram`, `cell_apply`): in window mode each 8x8 window
  is a cell; in grid mode (one group per offset in the window, the windows its tokens) the kernels read the map
  as if regrouped by offset, which makes each group a block of pixels (in place: no regrouped copies).
The shallow conv, ESA's small strided branch and the upsampler's convs stay the network's modules. Sums are formed in
another order than the straight modules, so outputs differ by float rounding (the golden tests bound it).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import (
    GELU,
    NO_ACT,
    BufferPool,
    cached_on,
    depthwise_taps,
    gemm_operand,
    layer_norm_args,
)
from .network import WINDOW


class _Weights:
    """Rearranged weights, each made on first use (kept on the model by `cached_on` until a parameter changes)."""

    def __init__(self):
        self.items: dict = {}

    def __call__(self, module: nn.Module, tag: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = (id(module), tag)
        if key not in self.items:
            self.items[key] = make()
        return self.items[key]


class _Map:
    """The shape of the maps of one forward: n images of h x w pixels (multiples of the 8 px windows)."""

    def __init__(self, ops, weights: _Weights, pool: BufferPool, n: int, h: int, w: int):
        self.ops, self.weights, self.n, self.h, self.w = ops, weights, n, h, w
        self.pixels = n * h * w
        self.pool = pool.start((n, h, w))

    def segments(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's and each column's cell index, for cells of rows x cols pixels (the cell kernels' layout)."""
        return torch.arange(self.h) // rows, torch.arange(self.w) // cols

    def empty(self, channels: int) -> torch.Tensor:
        return self.pool.empty(self.pixels, channels)

    def gemm(self, x: torch.Tensor, conv: nn.Module, out: torch.Tensor | None = None, tag: str = "",
             columns: slice | None = None, norm: nn.Module | None = None,
             matrix: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """out (+)= x @ conv's weight (input channels `columns` of it), without the bias; a new map when out is
        None. `norm`: a LayerNorm applied to x's pixels first, inside the kernel. `matrix`: makes the (out, in)
        matrix to use instead of the weight (give a `tag` for it)."""
        def make():
            if matrix is not None:
                return gemm_operand(matrix())
            w = conv.weight.detach().reshape(conv.weight.shape[0], -1)
            return gemm_operand(w if columns is None else w[:, columns])

        weight = self.weights(conv, f"gemm{tag}", make)
        accumulate = out is not None
        if out is None:
            out = self.empty(conv.weight.shape[0])
        self.ops.gemm(x, weight, out, accumulate, *layer_norm_args(norm))
        return out


# -- the pieces --------------------------------------------------------------------------------------------------


def _gated_ffn(m: _Map, gfn: nn.Module, x: torch.Tensor, acc: torch.Tensor, norm: nn.Module) -> None:
    """acc += project_out(GELU(h1) * h2), [h1, h2] = dwconv(project_in(norm(x))): one pw_dwconv pass (with the
    LayerNorm) and a GEMM."""
    w_in = m.weights(gfn, "in", lambda: gemm_operand(gfn.project_in.weight))
    w_dw = m.weights(gfn, "dw", lambda: depthwise_taps(gfn.dwconv.weight))
    gated = m.empty(x.shape[1])
    m.ops.pw_dwconv(x, m.n, m.h, m.w, w_in, 0, w_dw, None, False, None, NO_ACT, 1, gated, None, None, *layer_norm_args(norm))
    m.gemm(gated, gfn.project_out, acc)


def _local_block(m: _Map, block: nn.Module, x: torch.Tensor, in_place: bool = True) -> torch.Tensor:
    """x + 1x1(SE(GELU(dw3x3(GELU(1x1(x)))))), into x itself (the distillation reads a slice once), or a new map
    when not `in_place`."""
    conv_a, _, dw, _, se, conv_b = block.net.fn
    d = x.shape[1]
    t = m.gemm(x, conv_a)
    m.ops.bias_act(t, conv_a.bias, GELU, t)
    u = m.empty(d)
    m.ops.dwconv3x3(t, m.n, m.h, m.w, m.weights(dw, "dw", lambda: depthwise_taps(dw.weight)), dw.bias, 1, False,
                    None, GELU, 0, u)
    gate = se.gate  # mean -> linear -> SiLU -> linear -> sigmoid, per image
    g = torch.sigmoid(F.linear(F.silu(F.linear(u.view(m.n, -1, d).mean(1), gate[1].weight)), gate[3].weight))
    out = x
    if not in_place:
        out = m.empty(d)
        out.copy_(x)
    w_b = m.weights(conv_b, "t", lambda: conv_b.weight.detach().reshape(d, d).t().contiguous())
    rows = m.h * m.w
    for i in range(m.n):  # (u * g) @ W = u @ (g-scaled rows of W)
        w_i = F.pad(w_b * g[i][:, None], (0, -d % 16)).contiguous()
        m.ops.gemm(u[i * rows : (i + 1) * rows], w_i, out[i * rows : (i + 1) * rows], True)
    return out.add_(conv_b.bias)


def _spatial_attention(m: _Map, block: nn.Module, x: torch.Tensor, attn: torch.Tensor | None):
    """The SLA/SGA block: x + to_out(attn @ v) over 8x8 windows or grids, then + the gated FFN, into x itself
    (its input is not needed afterwards); and the attention map (computed by group 0, given to the others).
    to_out is folded into v's weights, (P v) W_outᵀ = P (z (W_out W_v)ᵀ), as the attention mixes tokens and the
    projections channels: one d x d GEMM and one map pass fewer, and the attention kernel adds its sums to x."""
    a = block.attn
    d = x.shape[1]
    groups = m.pixels // (WINDOW * WINDOW)

    def folded(w_v: torch.Tensor) -> torch.Tensor:  # W_out W_v, summed in float64
        return (a.to_out[0].weight.detach().double() @ w_v.detach().double()).float()

    if block.compute:
        w = a.to_qkv.weight
        qkv = m.gemm(x, a.to_qkv, tag="fold", norm=block.norm,
                     matrix=lambda: torch.cat((w.detach()[: 2 * d], folded(w[2 * d :]))))
        bias = m.weights(a, "bias", lambda: a.rel_pos_bias(a.rel_pos_indices).squeeze(-1).detach().contiguous())
        attn = m.pool.empty(groups, WINDOW * WINDOW, WINDOW * WINDOW)
        m.ops.token_attention(qkv, m.n, m.h, m.w, block.grid, d, 0, d, 2 * d, bias, a.scale, None, attn, x, True)
    else:
        v = m.gemm(x, a.to_v, tag="fold", norm=block.norm, matrix=lambda: folded(a.to_v.weight))
        m.ops.token_attention(v, m.n, m.h, m.w, block.grid, d, 0, 0, 0, None, 1.0, attn, None, x, True)
    _gated_ffn(m, block.gfn, x, x, block.cnorm)
    return x, attn


def _cells_channel_attention(m: _Map, ca: nn.Module, qkv: torch.Tensor, acc: torch.Tensor, offsets: int,
                             rows: torch.Tensor, cols: torch.Tensor, ny: int, nx: int) -> torch.Tensor:
    """acc + project_out of the channel attention with each cell of the map a group (rows / cols: each row's and
    column's cell index; of the map regrouped by offset in `offsets` x `offsets` windows when not 0), on AGDN's
    cell kernels: per cell the (C x C) product and the channels' squared norms in one pass over the map, then per
    cell M = (project_out @ softmax(...))ᵀ, then acc + v @ M in one pass; a new map. The map's channels are
    k, q, v (see `_channel_attention`), so the product comes transposed, k qᵀ, and so does the softmax: its
    columns are normalised, and Mᵀ's batch is one matrix product with project_outᵀ."""
    c = qkv.shape[1] // 3
    gram_t = torch.empty(m.n, ny, nx, c, c)
    sq = torch.empty(m.n, ny, nx, 2 * c)
    m.ops.cell_gram(qkv, m.n, m.h, m.w, c, rows, cols, ny, nx, gram_t, sq, 1, offsets)
    # q and k L2-normalised along the tokens (F.normalize: divided by max(norm, 1e-12)) only scale the rows and
    # columns of k qᵀ: the (C x C) product is scaled instead
    inv = sq.sqrt_().clamp_(min=1e-12).reciprocal_()
    gram_t.mul_(inv[..., :c, None] * ca.temperature).mul_(inv[..., None, c:])
    attn_t = gram_t.softmax(dim=-2)  # attnᵀ: softmax over each query's keys, a column here
    # the kernel's rows are whole 16-float vectors: project_outᵀ comes with zero columns up to one
    w_out = m.weights(ca, "out_t", lambda: gemm_operand(ca.project_out.weight))
    mats = torch.empty(m.n, ny, nx, c, w_out.shape[1])  # (project_out @ attn)ᵀ
    m.ops.gemm(attn_t.view(-1, c), w_out, mats.view(-1, w_out.shape[1]), False)
    out = m.empty(c)
    m.ops.cell_apply(qkv[:, 2 * c :], acc, mats, m.n, m.h, m.w, rows, cols, ny, nx, out, None, None, offsets)
    return out


def _channel_attention(m: _Map, ca: nn.Module, x: torch.Tensor, acc: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """acc + project_out of the (C x C) attention of norm(x) inside windows (or across them, grid mode): a new
    map."""
    c = x.shape[1]

    def kqv(weight: torch.Tensor) -> torch.Tensor:  # the output channels in the order k, q, v: see above
        return torch.cat((weight[c : 2 * c], weight[:c], weight[2 * c :]))

    w_qkv = m.weights(ca, "kqv", lambda: gemm_operand(kqv(ca.qkv.weight)))
    w_dw = m.weights(ca, "dw", lambda: depthwise_taps(kqv(ca.qkv_dwconv.weight)))
    qkv = m.empty(3 * c)
    m.ops.pw_dwconv(x, m.n, m.h, m.w, w_qkv, 0, w_dw, None, False, None, NO_ACT, 0, qkv, None, None, *layer_norm_args(norm))
    if not ca.grid:
        rows, cols = m.segments(WINDOW, WINDOW)
        return _cells_channel_attention(m, ca, qkv, acc, 0, rows, cols, m.h // WINDOW, m.w // WINDOW)
    # grid mode: the kernels read the map regrouped by offset in the window (pixel (8i + u, 8j + v) at
    # (u * h/8 + i, v * w/8 + j)), where each group, one offset, is a block of h/8 x w/8 pixels
    rows, cols = m.segments(m.h // WINDOW, m.w // WINDOW)
    return _cells_channel_attention(m, ca, qkv, acc, WINDOW, rows, cols, WINDOW, WINDOW)


def _channel_transformer(m: _Map, bc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = _channel_attention(m, bc.cttn1, x, x, bc.canorm1)
    _gated_ffn(m, bc.gfn1, x, x, bc.cnorm1)
    x = _channel_attention(m, bc.cttn2, x, x, bc.canorm2)
    _gated_ffn(m, bc.gfn2, x, x, bc.cnorm2)
    return x


def _joined_gemm(m: _Map, conv: nn.Conv2d, parts: list[torch.Tensor]) -> torch.Tensor:
    """conv(cat(parts, channels)) + bias as one GEMM per part into the same output."""
    out, start = None, 0
    for i, part in enumerate(parts):
        width = part.shape[1]
        out = m.gemm(part, conv, out, tag=f"{start}", columns=slice(start, start + width))
        start += width
    return out.add_(conv.bias)


def _idsa(m: _Map, block: nn.Module, x: torch.Tensor, shared):
    c = block.split
    maps: list[torch.Tensor] = []

    def attend(i: int, t: torch.Tensor) -> torch.Tensor:
        for k, name in enumerate((f"SLA{i}", f"SGA{i}")):
            t, a = _spatial_attention(m, getattr(block, name), t, None if shared is None else shared[2 * i - 2 + k])
            maps.append(a)
        return t

    x = _local_block(m, block.LB1, x, in_place=False)  # the group's input is its residual
    x = _joined_gemm(m, block.pw1, [attend(1, x[:, c:]), x[:, :c]])
    x1 = x[:, :c]
    t = _local_block(m, block.LB2, x[:, c:])
    x = _joined_gemm(m, block.pw2, [attend(2, t[:, c:]), t[:, :c]])
    x2 = x[:, :c]
    t = _local_block(m, block.LB3, x[:, c:])
    x = _joined_gemm(m, block.pw3, [x1, x2, attend(3, t[:, c:]), t[:, :c]])
    return _channel_transformer(m, block.BlockC, x), tuple(maps)


def _esa(m: _Map, esa: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(conv4(up(conv3(maxpool(conv2(conv1(x))))) + conv_f(conv1(x)))), in place."""
    c1_ = m.gemm(x, esa.conv1).add_(esa.conv1.bias)
    f = c1_.shape[1]
    small = esa.conv3(F.max_pool2d(esa.conv2(c1_.view(m.n, m.h, m.w, f).permute(0, 3, 1, 2)), 7, 3))
    up = F.interpolate(small, size=(m.h, m.w), mode="bilinear", align_corners=False)
    s = up.permute(0, 2, 3, 1).reshape(-1, f).contiguous()
    m.gemm(c1_, esa.conv_f, s)
    s.add_(esa.conv_f.bias)
    gate = m.gemm(s, esa.conv4).add_(esa.conv4.bias).sigmoid_()
    return x.mul_(gate)


def _group(m: _Map, group: nn.Module, x: torch.Tensor, shared):
    block = group.residual_layer[0] if group.compute else group.residual_layer
    t, maps = _idsa(m, block, x, shared)
    m.gemm(t, group.res_end, x)  # x + res_end(t), in place: the group's input is not needed any more
    x.add_(group.res_end.bias)
    return _esa(m, group.esa, x), maps


def forward_raw(model: nn.Module, ops, x: torch.Tensor) -> torch.Tensor:
    """`model.forward_raw(x)` on the kernels `ops` (float32, CPU, no autograd)."""
    h, w = x.shape[-2:]
    # channels-last from the first conv on (oneDNN keeps its input's layout), so that f0 is already the groups'
    # (pixels, C) matrix and the tail adds it without a layout change
    f0 = model.input(model.pad_raw(x).contiguous(memory_format=torch.channels_last))
    n, c, hp, wp = f0.shape
    m = _Map(ops, cached_on(model, _Weights), BufferPool.of(model), n, hp, wp)
    y = f0.permute(0, 2, 3, 1).reshape(-1, c).clone()  # a copy: the groups update their input, f0 is the skip
    y, maps = _group(m, model.block0, y, None)
    for k in range(1, model.groups):
        y, _ = _group(m, getattr(model, f"block{k}"), y, maps)
    return _tail(m, model, y, f0, h, w)


def _tail(m: _Map, model: nn.Module, y: torch.Tensor, f0: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """`model.tail` on channels-last maps: the output conv plus f0, the upsampler's conv, and the kernels' pixel
    shuffle from its channels-last rows to the NCHW output (PyTorch's mixed-layout add and 6-D shuffle copy cost
    3 ms of a 4-tile forward)."""
    n, hp, wp, s = m.n, m.h, m.w, model.scale
    z = model.output(y.view(n, hp, wp, -1).permute(0, 3, 1, 2)).add_(f0)
    u = model.up[0](z)
    out = torch.empty(n, u.shape[1] // (s * s), s * hp, s * wp)
    m.ops.pixel_shuffle(u.permute(0, 2, 3, 1).reshape(n * hp * wp, -1), n, hp, wp, s, out)
    return out[..., : h * s, : w * s]
