"""ESC's CPU path on the fused kernels (`..kernels`), float32: the function of `network.py`, rearranged for speed.

The blocks run on channels-last maps, (pixels, channels) matrices, the kernels' layout; the shallow conv and
the tail (`tail`) stay the network's own modules, on a channels-last view. Per block:
- window attention (§3.5): the `window_attention` kernel reads the relative-position bias from the table (16
  consecutive entries per query and key row) where PyTorch's attention streams a dense (W² x W²) bias per head
  from memory, and keeps a query block's scores in the cache: about 2x `scaled_dot_product_attention`;
- ConvFFN (§3.2): GEMM (with the LayerNorm before it, if any, as its prologue), bias + GELU, then the
  depthwise 3x3 with its bias, GELU and the residual in one pass, GEMM;
- ConvAttn (§3.4): the shared 13x13 kernel is D4-symmetric, so the `sym_conv` kernel sums the inputs of each
  of its 28 tap orbits and multiplies once per orbit (6x fewer multiply-adds than 169 taps; oneDNN's direct
  conv was at the FMA peak already); the per-image dynamic 3x3 is added by the depthwise kernel in place; the
  1x1 aggregation is a GEMM that adds straight into the block's running sum (the residual).
Scratch maps come from a pool kept on the model (`kernels.BufferPool`: no page faults after the first pass).
Sums are formed in another order than the straight modules, so outputs differ by float rounding (the golden
tests bound it); every kernel's result is the same at any thread count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import (
    GELU,
    GELU_THEN_RESIDUAL,
    NO_ACT,
    BufferPool,
    cached_on,
    depthwise_taps,
    gemm_operand,
    layer_norm_args,
)
from ..layers import LayerNorm2d, pad_to_multiple
from .network import Block, ConvAttn, ConvFFN, DynamicLargeKernel, WindowAttention


def supports(model: nn.Module) -> bool:
    """Whether the kernels cover this network's shapes: heads of 16 channels, windows a multiple of 16."""
    attn = model.blocks[0].attn
    return attn.dim // attn.num_heads == 16 and attn.window_size % 16 == 0


# -- weights, rearranged once per set of parameters -------------------------------------------------------------


def _gemm_weight(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 1x1 conv as the kernels' GEMM operand and its bias."""
    return gemm_operand(conv.weight), None if conv.bias is None else conv.bias.detach().contiguous()


@dataclass
class _FFN:
    w1: torch.Tensor
    b1: torch.Tensor
    hidden: int
    dw: torch.Tensor
    dw_bias: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    @classmethod
    def of(cls, ffn: ConvFFN) -> "_FFN":
        w1, b1 = _gemm_weight(ffn.proj)
        w2, b2 = _gemm_weight(ffn.aggr)
        return cls(w1, b1, ffn.proj.out_channels, depthwise_taps(ffn.dwc.weight), ffn.dwc.bias.detach(), w2, b2)


@dataclass
class _BlockWeights:
    proj: _FFN
    qkv: tuple[torch.Tensor, torch.Tensor]
    out: tuple[torch.Tensor, torch.Tensor]
    table: torch.Tensor
    ffns: list[_FFN]
    aggr: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, block: Block) -> "_BlockWeights":
        return cls(_FFN.of(block.proj), _gemm_weight(block.attn.to_qkv), _gemm_weight(block.attn.to_out),
                   block.attn.relative_position_bias.detach().contiguous(),
                   [_FFN.of(f) for f in block.convffns], [_gemm_weight(p.aggr) for p in block.pconvs])


def orbit_weight(kernel: torch.Tensor) -> torch.Tensor:
    """A D4-symmetric (O, C, k, k) kernel as the `sym_conv` kernel's (orbits * C, O padded to 16) operand: one row
    block per orbit {|dy|, |dx|} = (a, b), a <= b, each the mean of its taps (equal up to rounding)."""
    o, c, k, _ = kernel.shape
    r = k // 2
    sym = kernel.detach().double()
    sym = (sym + sym.transpose(-2, -1)) / 2
    sym = (sym + sym.flip(-1)) / 2
    sym = (sym + sym.flip(-2)) / 2
    rows = [sym[:, :, r + a, r + b].t() for a in range(r + 1) for b in range(a, r + 1)]
    return F.pad(torch.cat(rows).float(), (0, -o % 16)).contiguous()


def _weights(model: nn.Module) -> tuple[list[_BlockWeights], torch.Tensor | None]:
    """The blocks' rearranged weights and the large kernel's orbit weight (ESC, ESC-Real)."""

    def make():
        large = model.large_kernel()
        orbits = orbit_weight(large) if isinstance(large, torch.Tensor) else None
        return [_BlockWeights.of(b) for b in model.blocks], orbits

    return cached_on(model, make)


# -- the pieces ----------------------------------------------------------------------------------------------------


def _layer_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    if not isinstance(norm, LayerNorm2d):
        return x  # nn.Identity (ESC without use_ln)
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def _conv_nhwc(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A dense conv of an (n, h, w, c) map through oneDNN on its channels-last view; (n, h, w, out) back."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()


def _ffn(ops, pool: BufferPool, fw: _FFN, x: torch.Tensor, norm: nn.Module, n: int, h: int, w: int) -> torch.Tensor:
    """ConvFFN(norm(x)), the LayerNorm (if any) inside the first GEMM."""
    hidden = pool.empty(x.shape[0], fw.hidden)
    ops.gemm(x, fw.w1, hidden, False, *layer_norm_args(norm))
    ops.bias_act(hidden, fw.b1, GELU, hidden)
    mixed = pool.empty(x.shape[0], fw.hidden)
    ops.dwconv3x3(hidden, n, h, w, fw.dw, fw.dw_bias, 1, False, hidden, GELU_THEN_RESIDUAL, 0, mixed)
    out = pool.empty(x.shape[0], x.shape[1])
    ops.gemm(mixed, fw.w2, out, False)
    ops.bias_act(out, fw.b2, NO_ACT, out)
    return out


def _add_gemm(ops, x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor], acc: torch.Tensor) -> None:
    """acc += x @ w + b (a 1x1 conv added into a running sum)."""
    ops.gemm(x, weight[0], acc, True)
    acc.add_(weight[1])


def _attention(ops, pool: BufferPool, attn: WindowAttention, bw: _BlockWeights, x: torch.Tensor, norm: nn.Module,
               acc: torch.Tensor, n: int, h: int, w: int) -> None:
    """acc += the block's window attention of norm(x) (§3.5)."""
    c, heads, ws = attn.dim, attn.num_heads, attn.window_size
    d = c // heads
    qkv = pool.empty(x.shape[0], 3 * c)
    ops.gemm(x, bw.qkv[0], qkv, False, *layer_norm_args(norm))
    ops.bias_act(qkv, bw.qkv[1], NO_ACT, qkv)
    # the straight path pads before its 1x1 qkv conv; padding after it is the same, as the conv is pointwise
    grid = pad_to_multiple(qkv.view(n, h, w, 3 * c).permute(0, 3, 1, 2), ws).permute(0, 2, 3, 1)
    hp, wp = grid.shape[1:3]
    nh, nw = hp // ws, wp // ws
    # windows ordered (batch, row-block, col-block) then head: window g uses head g % heads, as the kernel reads
    win = grid.reshape(n, nh, ws, nw, ws, 3, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
    win = win.reshape(3, n * nh * nw * heads, ws * ws, d)
    q, k, v = win[0].contiguous(), win[1], win[2].contiguous()  # a view, not a copy, for a single window
    out = pool.empty(*q.shape)
    ops.window_attention(q, k.transpose(1, 2).contiguous(), v, bw.table, ws, d**-0.5, out)
    out = out.view(n, nh, nw, heads, ws, ws, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, hp, wp, c)
    _add_gemm(ops, out[:, :h, :w].reshape(-1, c), bw.out, acc)


def _conv_attn(ops, pool: BufferPool, pconv: ConvAttn, aggr, x: torch.Tensor, acc: torch.Tensor, large_kernel,
               orbits, n: int, h: int, w: int) -> None:
    """acc += ConvAttn(x) (§3.4); x's first pdim channels are overwritten with the large-kernel branch."""
    p = pconv.pdim
    x1 = x.view(n, h, w, -1)[..., :p].permute(0, 3, 1, 2)  # NCHW view of the partial channels
    plk = pconv.plk
    if isinstance(plk, DynamicLargeKernel):
        gen = plk.dwc_proj  # pool -> 1x1 -> GELU -> 1x1, on the per-image channel means
        mean = x1.mean(dim=(2, 3))
        z = F.gelu(F.linear(mean, gen[1].weight.flatten(1), gen[1].bias))
        dynamic = F.linear(z, gen[3].weight.flatten(1), gen[3].bias).view(n, p, 9)
        large = pool.empty(n, h, w, p)
        ops.sym_conv(x[:, :p], n, h, w, p, large_kernel.shape[-1], orbits, large.view(-1, p))
        src = x.view(n, h * w, -1)[..., :p]
        for i in range(n):  # + the image's own depthwise 3x3, in place
            li = large[i].view(h * w, p)
            ops.dwconv3x3(src[i], 1, h, w, F.pad(dynamic[i].t(), (0, 16)).contiguous(), None, 1, False, li, NO_ACT, 0, li)
        x1 = large
    else:  # ESC-FP's decomposed kernel: its own modules (a 1x1 and a depthwise 13x13, a small share of the time)
        x1 = plk(x1, large_kernel).permute(0, 2, 3, 1)
    x[:, :p].copy_(x1.reshape(-1, p))
    _add_gemm(ops, x, aggr, acc)


def _block(ops, pool: BufferPool, block: Block, bw: _BlockWeights, f: torch.Tensor, large_kernel,
           orbits) -> torch.Tensor:
    n, h, w, c = f.shape
    y = _ffn(ops, pool, bw.proj, f.view(-1, c), block.ln_proj, n, h, w)  # the block's running sum from here
    _attention(ops, pool, block.attn, bw, y, block.ln_attn, y, n, h, w)
    for ln, fw, pconv, aggr in zip(block.lns, bw.ffns, block.pconvs, bw.aggr):
        t = _ffn(ops, pool, fw, y, ln, n, h, w)
        _conv_attn(ops, pool, pconv, aggr, t, y, large_kernel, orbits, n, h, w)
    out = _conv_nhwc(_layer_norm(y, block.ln_out).view(n, h, w, c), block.conv_out)
    return out.add_(f)


def fast_forward(model: nn.Module, ops, x: torch.Tensor) -> torch.Tensor:
    """`model(x)` of any ESC network on the kernels `ops` (float32, CPU, no autograd)."""
    weights, orbits = _weights(model)
    large_kernel = model.large_kernel()
    f0 = model.proj(x)
    f = f0.permute(0, 2, 3, 1).contiguous()
    pool = BufferPool.of(model).start(f.shape)
    for block, bw in zip(model.blocks, weights):
        f = _block(ops, pool, block, bw, f, large_kernel, orbits)
    return model.tail(f.permute(0, 3, 1, 2), f0, x)
