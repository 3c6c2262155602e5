"""AGDN's fused-kernel path: the fast path on the fused CPU kernels (float32 on the CPU).

The kernels are `kernels/cpu_kernels.cpp`, built on first use; without them `fast.py` runs.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..base import Placement
from ..kernels import depthwise_taps, pad_columns
from .fast import _cell_layout, _fast_weights, _nhwc, _rows, _Workspace
from .network import (
    AGDB,
    HEADS,
    LOCAL_STATS_WINDOW,
    MVSA_STRIDE,
    RCCA,
    BSConv,
    SparseAttention,
    _coarse_size,
)

#
# The fast path again, on the fused CPU kernels of `kernels/` (float32 CPU only; built on first use,
# else `_fast_forward` runs). Same algebra as `_fast_forward` plus these exact rearrangements:
# - a 1x1 conv that feeds a depthwise conv runs inside the depthwise kernel, a few image rows at a time
#   (`pw_dwconv`): the FFN's project_in + dwconv + gate (+ project_out, per row), and qkv + qkv_dwconv with the
#   attention's grams summed from each unit of rows as it is made (`qkv_gram`: only v is stored); their wide
#   intermediate maps never reach memory;
# - the distillation (c{k}_d + c{k}_r as one GEMM per k, their depthwise convs, c4, c5) is one pass down the map
#   (`distill_chain`), each stage a row behind the one before, so that only u and z reach memory (on a photo's
#   tile every map streams from memory, and these were five of them);
# - GEMMs are written without their bias, which is added by the kernel that reads the result, or folded
#   forward (c5's bias into MVSA, exactly: every consumer of z is affine in it before MVSA's product; a bias
#   before a reflect-padded depthwise conv becomes bias * sum of its taps); GEMM weights are padded to whole
#   16-float vectors of output columns (`kernels.pad_columns`), as the kernels' GEMM reads them;
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


def _kernel_block_weights(bw: dict, blk: "AGDB") -> dict:
    f32 = torch.float32
    c = bw["c5_wt"].shape[1]
    out: dict = {}
    for k in (1, 2, 3):
        out[f"dr{k}"] = pad_columns(torch.cat([bw[f"d{k}_w"].t(), bw[f"r{k}_wt"]], dim=1).to(f32))
        out[f"d{k}_b"] = bw[f"d{k}_b"].flatten().to(f32)
        out[f"r{k}_dw"], out[f"r{k}_dwb"] = depthwise_taps(bw[f"r{k}_dw"].float()), bw[f"r{k}_dwb"].float()
    out["c4_dw"], out["c4_b"] = depthwise_taps(bw["c4_dw"].float()), bw["c4_b"].flatten().to(f32)
    out["c5_wt"] = pad_columns(bw["c5_wt"].to(f32))
    b5 = bw["c5_b"].double()
    cf_wt, s2_wt = bw["cf_wt"].double(), bw["s2_wt"].double()
    out["mvsa_wt"] = pad_columns(torch.cat([cf_wt, s2_wt], dim=1).to(f32))
    out["cf_b"] = (bw["cf_b"].double() + b5 @ cf_wt).to(f32)
    s2_dw = bw["s2_dw"].double()
    s2_bias = bw["s2_b"].double() + b5 @ s2_wt  # constant per channel before a reflect-padded conv
    out["s2_dw"] = depthwise_taps(s2_dw.float())
    out["s2_dwb"] = (bw["s2_dwb"].double() + s2_bias * s2_dw.flatten(1).sum(1)).to(f32)
    w4 = bw["c4m_wt"].float()
    out["w4"] = w4.new_zeros(w4.shape[0], -(-c // _LANES) * _LANES)
    out["w4"][:, :c] = w4
    out["b4"], out["z_bias"] = bw["c4m_b"].float(), b5.to(f32)
    out["cca_dw"], out["cca_dwb"] = depthwise_taps(bw["cca_dw"].float()), bw["cca_dwb"].float()
    out["dec_w"], out["dec_b"] = bw["dec_w"].float().contiguous(), float(bw["dec_b"].item())
    out["sigma"] = bw["sigma"].float().contiguous()
    du0, du2 = blk.cca.cca.conv_du[0], blk.cca.cca.conv_du[2]
    out["du0_w"], out["du0_b"] = du0.weight.detach().flatten(1).float().contiguous(), du0.bias.detach().float()
    out["du2_w"], out["du2_b"] = du2.weight.detach().flatten(1).float().contiguous(), du2.bias.detach().float()
    for k in ("ln3_w", "ln3_b", "ln4_w", "ln4_b"):
        out[k] = bw[k].float().contiguous()
    out["qkv_wt"], out["qkv_dw"] = pad_columns(bw["qkv_wt"].float()), depthwise_taps(bw["qkv_dw"].float())
    out["ffin_wt"] = pad_columns(torch.cat([bw["ffa_wt"], bw["ffb_wt"]], dim=1).float())
    out["ff_dw"] = depthwise_taps(torch.cat([bw["ffa_dw"], bw["ffb_dw"]]).float())
    out["ffo_wt"] = pad_columns(bw["ffo_wt"].float())
    for k in ("tau", "heads", "proj"):  # the attention core is shared with the fast path
        out[k] = bw[k]
    m = blk.esa.body[0]  # MVSA's coarse-branch BSConvs, as `mvsa_coarse` reads them

    def bsconv(conv: BSConv) -> list[torch.Tensor]:
        return [conv.pw.weight.detach().flatten(), conv.dw.weight.detach().flatten(), conv.dw.bias.detach()]

    out["coarse"] = torch.stack([torch.cat(bsconv(m.conv_max_1) + bsconv(m.conv3_1)),
                                 torch.cat(bsconv(m.conv_max_2) + bsconv(m.conv3_2))]).to(f32).contiguous()
    return out


def _kernel_weights(model: nn.Module, x: torch.Tensor) -> dict:
    wts = _fast_weights(model, x)
    if "kernel" not in wts:
        c = model.c1.out_channels
        wts["kernel"] = {
            "blocks": [_kernel_block_weights(b, getattr(model, f"B{i + 1}")) for i, b in enumerate(wts["blocks"])],
            "c1_wt": [pad_columns(wts["c1_wt"][i * c : (i + 1) * c]) for i in range(model.num_block)],
            "c1_b": wts["c1_b"], "c2_wt": pad_columns(wts["c2_wt"]),
            # fea_conv as a GEMM on 3x3 patches, rows (ky, kx, input channel) like `_kernel_head`'s
            "fea_wt": pad_columns(model.fea_conv.weight.detach().permute(2, 3, 1, 0).reshape(-1, c).to(x.dtype)),
            "fea_b": model.fea_conv.bias.detach().to(x.dtype).contiguous(),
            "c2_dw": depthwise_taps(wts["c2_dw"]), "c2_dwb": wts["c2_dwb"].contiguous(),
            # the mean added back after the pixel shuffle, as the upsampler conv's bias instead: output channel
            # k comes from conv channels k*s*s .. (k+1)*s*s - 1; saves a pass over the full-size output
            "up_b": (model.upsampler[0].bias.detach().double()
                     + model.rgb_mean.double().flatten().repeat_interleave(model.scale**2)).to(x.dtype),
        }
    return wts["kernel"]


def _band_rows(w: int) -> int:
    """Rows per band for the passes that run a map a band of rows at a time (the first and last convs): about
    16 K pixels, a working set that stays in the caches, and no full-size temporary."""
    return max(1, _BAND_PIXELS // max(w, 1))


_BAND_PIXELS = 16384


def _kernel_forward(model: nn.Module, ops, x: torch.Tensor, placement: Placement | None) -> torch.Tensor:
    kw = _kernel_weights(model, x)
    n, _, h, w = x.shape
    c = model.c1.out_channels
    p = n * h * w
    # scratch kept on the model between calls and grown, never shrunk (dropped when a run ends with it large:
    # `AGDNArchitecture.release_scratch`): fresh multi-megabyte buffers cost a page fault per 4 KiB on first
    # touch, which was a third of the run time at 128 x 128, and tiles of a photo come in a few sizes
    ws = model._workspace = model._workspace or _Workspace(x)
    x = x - model.rgb_mean.to(x.dtype)
    u = _kernel_head(ops, kw, x, ws("u", p, c))
    acc = ws("c1", p, c)  # c1's output, accumulated block by block
    for i, bw in enumerate(kw["blocks"]):
        _kernel_block(ops, bw, getattr(model, f"B{i + 1}"), u, n, h, w, placement, ws)
        ops.gemm(u, kw["c1_wt"][i], acc, i > 0)
    ops.bias_act(acc, kw["c1_b"], 1, acc)
    t, pw = ws("r1", p, c), ws("r0", p, c)
    ops.gemm(acc, kw["c2_wt"], pw, False)
    # again (cheaper than keeping a map through the blocks), into c1's map: that GEMM was its last reader
    f0 = _kernel_head(ops, kw, x, acc)
    ops.dwconv3x3(pw, n, h, w, kw["c2_dw"], kw["c2_dwb"], 1, True, f0, 0, 0, t)
    return _kernel_tail(model, ops, kw, t, n, h, w)


def _kernel_head(ops, kw: dict, x: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
    """fea_conv (3x3, 3 -> C, zero padding) into the (pixels, C) rows `f0`, as GEMMs of each band's 3x3 patches
    by the weights on the kernels' GEMM: PyTorch's conv for 3 input channels sums in an order that depends on
    the thread count (an im2col GEMM split over threads), and the output must not. Band by band, so that the
    patches (27 floats a pixel) never exist for the whole map."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (n, h + 2, w + 2, 3)
    rows = _band_rows(w)
    for i in range(n):
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            patches = torch.cat([padded[i, y0 + ky : y1 + ky, kx : kx + w] for ky in range(3) for kx in range(3)], -1)
            ops.gemm(patches.view(-1, patches.shape[-1]), kw["fea_wt"], f0[(i * h + y0) * w : (i * h + y1) * w],
                     False)
    ops.bias_act(f0, kw["fea_b"], 0, f0)
    return f0


def _kernel_tail(model: nn.Module, ops, kw: dict, t: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """The upsampler: its 3x3 conv (C -> 3 s^2, the RGB mean in its bias) and the pixel shuffle, a band of rows
    at a time, so that the conv's output (3 s^2 floats a pixel, more than the map) exists for one band only."""
    up, s = model.upsampler[0], model.scale
    out = t.new_empty(n, up.out_channels // (s * s), h * s, w * s)
    t_map = _nhwc(t, n, h, w)  # channels-last view
    rows = _band_rows(w)
    for i in range(n):
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            a, b = max(0, y0 - 1), min(h, y1 + 1)  # the band and the rows its 3x3 taps read
            y = F.conv2d(t_map[i : i + 1, :, a:b], up.weight, kw["up_b"], padding=up.padding)
            # rows of y outside [y0, y1) saw zero padding where the map goes on: dropped
            y = _rows(y[:, :, y0 - a : y1 - a]).contiguous()  # channels-last like its input: no copy
            ops.pixel_shuffle(y, 1, y1 - y0, w, s, out[i : i + 1], y0)
    return out


def _kernel_block(ops, bw: dict, blk: "AGDB", u: torch.Tensor, n: int, h: int, w: int,
                  placement: Placement | None, ws: _Workspace) -> None:
    """One AGDB on (pixels, C) rows `u`, in place: the block's input is read for the last time, pixel by pixel,
    as the residual of the pass that writes its output there.

    Scratch buffers are shared by stage, to keep the working set small (at 128 x 128 the separate buffers
    added up to 73 MB, more than the caches hold, and every op ran from main memory at about half speed), and
    so is the memory a tile needs, which sets how large tiles may be: "r0" holds z, "r1" RCCA's t (on tiles
    RCCA's output, z from then on), and v goes to whichever of the two RCCA left free; before RCCA, "r1" holds
    MVSA's conv_f output and stride-2 maps. Four C-wide maps in all with c1's. The distillation's maps never
    reach memory (`distill_chain`), nor do the attention's q and k (`qkv_gram`), nor RCCA's t on tiles
    (`rcca_local`)."""
    p, c = u.shape
    dc = c // 2
    # per k, one GEMM for [c{k}_d | c{k}_r pointwise]; r_k = GELU(dw(pw) + bias + r_{k-1}) and d_k = GELU(c{k}_d +
    # bias); c4 on r_3; c5 (without its bias: folded into MVSA) on [d1 | d2 | d3 | r4]. One pass, which holds the
    # r maps and c5's input as a few rows per thread
    z0 = ws("r0", p, c)
    ops.distill_chain(u, n, h, w, [bw[f"dr{k}"] for k in (1, 2, 3)], dc, [bw[f"r{k}_dw"] for k in (1, 2, 3)],
                      [bw[f"r{k}_dwb"] for k in (1, 2, 3)], [bw[f"d{k}_b"] for k in (1, 2, 3)], bw["c4_dw"],
                      bw["c4_b"], bw["c5_wt"], z0)
    _kernel_mvsa(ops, bw, z0, n, h, w, placement, ws)
    z = _kernel_rcca(ops, bw, blk.cca, z0, n, h, w, placement, ws)
    v = ws("r1", p, c) if z is z0 else z0
    # z += Attn (in place) and u = z + Attn + u
    _kernel_attention(ops, bw, blk.ea.restormer_attn, z, n, h, w, placement, v, u, u)
    # LN4, project_in, dwconv, the gate and project_out (added to u) in one pass: the 4C-wide hidden map exists
    # only as three rows per thread, the 2C-wide gated one as one row
    ops.pw_dwconv(z, n, h, w, bw["ffin_wt"], 0, bw["ff_dw"], None, False, None, 0, 1, z.new_empty(0, 2 * c), None,
                  None, bw["ln4_w"], bw["ln4_b"], 1e-5, bw["ffo_wt"], u)


def _kernel_attention(ops, bw: dict, attn: SparseAttention, z: torch.Tensor, n: int, h: int, w: int, placement,
                      v: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """z + project_out(attention(LN3(z))) into `out` (pixels, C): one kernel pass for LN3, qkv, its depthwise conv
    and the cells' grams (q and k stay in a thread's rows; v goes to the scratch map `v`), one for the output;
    with `residual`, that sum goes to z (in place) and out = sum + residual (out may be the residual itself:
    `cell_apply` reads each pixel's residual before it writes that pixel)."""
    p, c = z.shape
    ry, row_seg, cx, col_seg, to_windows, to_cells = _cell_layout(attn.tlc_window, h, w, placement)
    gram = z.new_empty(n, len(ry), len(cx), c, c)
    sq = z.new_empty(n, len(ry), len(cx), 2 * c)
    ops.qkv_gram(z, n, h, w, bw["qkv_wt"], bw["qkv_dw"], bw["ln3_w"], bw["ln3_b"], 1e-5, c, row_seg, col_seg, len(ry),
                 len(cx), HEADS, v, gram, sq)
    mats = z.new_empty(n, len(ry), len(cx), c, -(-c // _LANES) * _LANES)
    ops.cell_mats(gram, sq, to_windows, to_cells, bw["tau"], bw["proj"], HEADS, mats)  # `_cell_matrices`
    extra = () if residual is None else (residual, z)
    ops.cell_apply(v, z, mats, n, h, w, row_seg, col_seg, len(ry), len(cx), out, *extra)
    return out


def _kernel_mvsa(ops, bw: dict, z: torch.Tensor, n: int, h: int, w: int, placement, ws: _Workspace) -> None:
    """MVSA in place on z (which still lacks c5's bias; the kernel adds it)."""
    (p, c), f = z.shape, bw["cf_b"].shape[0]
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    # conv_f's output (F columns), the stride-2 maps (4F at a quarter of the pixels) and their planes for the
    # coarse branch in the scratch map "r1", which RCCA writes only after MVSA (grown where the map is too small
    # for them: a map of a few pixels)
    p2 = n * h2 * w2 * 4 * f
    free = ws("r1", 1, max(p * c, p * f + 2 * p2))[0]
    cf = free[: p * f].view(p, f)
    s2 = free[p * f : p * f + p2].view(n * h2 * w2, 4 * f)
    # [conv_f | conv2_1..conv2_4 pointwise] (conv1 folded in) and the branches' stride-2 depthwise conv in one
    # pass: conv_f's F columns go to `cf`, the other 4F only as three rows per thread
    ops.mvsa_head(z, n, h, w, bw["mvsa_wt"], f, bw["s2_dw"], bw["s2_dwb"], cf, s2)
    # the coarse maps: pooling, local variance, two BSConvs and a GELU per branch, in one call
    g1 = z.new_empty(n, f, (h2 + 2 - 5) // 3 + 1, (w2 + 2 - 5) // 3 + 1)
    g2 = z.new_empty(n, f, (h2 + 2 - 7) // 3 + 1, (w2 + 2 - 7) // 3 + 1)
    ops.mvsa_coarse(s2, n, h2, w2, bw["coarse"], g1, g2, free[p * f + p2 : p * f + 2 * p2])
    index, lam = _mvsa_sampling(h, w, (tuple(g1.shape[-2:]), tuple(g2.shape[-2:])), placement)
    ops.mvsa_tail(z, n, h, w, cf, bw["cf_b"], g1, g2, index, lam, bw["w4"], bw["b4"], bw["z_bias"])


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
                 ws: _Workspace) -> torch.Tensor:
    """RCCA on z; returns the map that holds the result: z itself (the whole image), or the scratch map "r1"
    (tiles: one pass from z into it)."""
    p, c = z.shape
    t = ws("r1", p, c)
    if placement is not None:
        # t, its statistics over each pixel's neighbourhood, conv_du and the output, row by row in one pass: t
        # only as a ring of rows per thread, the weights and GELU(decompose) never in memory
        ops.rcca_local(z, n, h, w, LOCAL_STATS_WINDOW, bw["cca_dw"], bw["cca_dwb"], bw["du0_w"], bw["du0_b"],
                       bw["du2_w"], bw["du2_b"], bw["dec_w"], bw["dec_b"], bw["sigma"], t)
        return t
    ops.dwconv3x3(z, n, h, w, bw["cca_dw"], bw["cca_dwb"], 1, False, None, 1, 0, t)
    g = ws("g", p, 1).view(p)
    sums = torch.empty(n, 2, c, dtype=torch.float64)
    ops.rcca_stats(t, n, bw["dec_w"], bw["dec_b"], g, sums)
    weight = z.new_empty(n, c)  # mean + std over the image, then conv_du, in one call
    ops.rcca_weight(t, sums, n, bw["du0_w"], bw["du0_b"], bw["du2_w"], bw["du2_b"], weight)
    ops.rcca_combine(z, t, g, bw["sigma"], weight, n)
    return z
