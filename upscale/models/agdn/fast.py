"""AGDN's fast path: the straight network's function rearranged for CPU speed, in eager PyTorch.

Works on a `StraightAGDN`'s modules and weights (folded once, cached on the model by `model.py`). The fused
kernels' path (`fused.py`) shares its weight folding, scratch buffers and attention layout.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Placement
from .network import (
    AGDB,
    HEADS,
    MVSA,
    RCCA,
    SparseAttention,
    _resize_as_whole_image,
    tlc_spans,
)

#
# The same function as the straight modules (`network.py`), rearranged for CPU speed (exact algebra; only float
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

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.buffers.values())

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


def _fast_weights(model: nn.Module, x: torch.Tensor) -> dict:
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


def _fast_forward(model: nn.Module, x: torch.Tensor, placement: Placement | None) -> torch.Tensor:
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
                    placement) -> torch.Tensor:
    """z + project_out(attention) from the (n, h, w, 3C) q|k|v map, global or on the TLC window grid."""
    p, c = z.shape
    rows, cols = attn._spans(h, w, placement)
    (ry, rcov), (cx, ccov) = _segments(rows, h, qkv.device), _segments(cols, w, qkv.device)
    to_windows, to_cells = _cover_matrices(rcov, ccov)
    out = torch.empty_like(z).view(n, h, w, c)
    zi = z.view(n, h, w, c)
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
