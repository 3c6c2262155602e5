"""The fused CPU kernels (`upscale/models/kernels`) against eager PyTorch, op by op, and their fallback.

The model-level checks (golden fixtures, fast path on the kernels vs the straight path) are in test_agdn.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from upscale.models import kernels
from upscale.models.agdn import fast, fused, network
from upscale.models.base import Placement

ops = kernels.load()
pytestmark = pytest.mark.skipif(ops is None, reason=f"fused CPU kernels unavailable: {kernels.status()}")


def _close(a, b, rel=2e-6, what=""):
    scale = max(float(b.abs().max()), 1.0)
    d = float((a.double() - b.double()).abs().max())
    assert d <= rel * scale, f"{what}: max |diff| {d:.3g} (scale {scale:.3g})"


def _rows(t):  # (n, c, h, w) -> (n*h*w, c)
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _eager_dw(x_rows, n, h, w, weight, bias, stride, reflect):
    x = x_rows.reshape(n, h, w, -1).permute(0, 3, 1, 2)
    if reflect:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias, stride, 0, 1, weight.shape[0])
    return F.conv2d(x, weight, bias, stride, 1, 1, weight.shape[0])


@pytest.mark.parametrize("n,h,w,c,stride,reflect", [
    (1, 16, 16, 42, 1, True), (2, 7, 9, 42, 1, False), (1, 17, 23, 40, 2, True), (1, 15, 16, 40, 2, True),
    (1, 2, 3, 16, 1, True), (1, 13, 5, 126, 1, False), (1, 1, 9, 21, 1, False),
])
def test_dwconv_bias_residual_gelu(n, h, w, c, stride, reflect):
    g = torch.Generator().manual_seed(h * w + c)
    wide = torch.randn(n * h * w, c + 5, generator=g)
    x = wide[:, 3 : 3 + c]  # a column slice of a wider matrix, as the model passes them
    weight, bias = torch.randn(c, 1, 3, 3, generator=g), torch.randn(c, generator=g)
    ref = _rows(_eager_dw(x, n, h, w, weight, bias, stride, reflect))
    res = torch.randn_like(ref)
    out = torch.full((ref.shape[0], c + 2), float("nan"))[:, 1 : 1 + c]
    for act in (0, 1):
        ops.dwconv3x3(x, n, h, w, kernels.depthwise_taps(weight), bias, stride, reflect, res, act, 0, out)
        want = ref + res
        _close(out, F.gelu(want) if act else want, what=f"act {act}")
    ops.dwconv3x3(x, n, h, w, kernels.depthwise_taps(weight), bias, stride, reflect, res, 2, 0, out)  # ESC's ConvFFN
    _close(out, F.gelu(ref) + res, what="GELU, then the residual")
    ops.dwconv3x3(x, n, h, w, kernels.depthwise_taps(weight), None, stride, reflect, None, 0, 0, out)
    _close(out, ref - bias, what="no bias")


def test_dwconv_gate_and_pair_modes():
    g = torch.Generator().manual_seed(1)
    n, h, w = 2, 11, 13
    x = torch.randn(n * h * w, 168, generator=g)
    weight = torch.randn(168, 1, 3, 3, generator=g)
    conv = _rows(_eager_dw(x, n, h, w, weight, None, 1, False))
    out = torch.empty(n * h * w, 84)
    ops.dwconv3x3(x, n, h, w, kernels.depthwise_taps(weight), None, 1, False, None, 0, 1, out)
    _close(out, F.gelu(conv[:, :84]) * conv[:, 84:], what="gate")
    # pair: AGDN's c4, a grouped 3x3 conv with two input channels per output
    x = torch.randn(n * h * w, 42, generator=g)
    grouped, bias = torch.randn(21, 2, 3, 3, generator=g), torch.randn(21, generator=g)
    xn = x.reshape(n, h, w, 42).permute(0, 3, 1, 2)
    ref = F.gelu(_rows(F.conv2d(xn, grouped, bias, 1, 1, 1, 21)))
    out = torch.empty(n * h * w, 21)
    ops.dwconv3x3(x, n, h, w, kernels.depthwise_taps(grouped.reshape(42, 1, 3, 3)), bias, 1, False, None, 1, 2, out)
    _close(out, ref, what="pair")


def test_gelu_is_exact_gelu_to_float32_accuracy():
    x = torch.linspace(-12, 12, 400_000).view(-1, 8)
    out = torch.empty_like(x)
    ops.bias_act(x, None, 1, out)
    truth = F.gelu(x.double())
    assert float((out.double() - truth).abs().max()) < 5e-7  # PyTorch's own float32 GELU: 1.2e-6 here
    assert torch.isfinite(out).all()
    if ops.capability() in ("AVX512", "AVX2"):  # the kernels' own GELU; others use ATen's erf formula (2e-4 here)
        big = truth.abs() > 1e-3
        assert float(((out.double() - truth).abs()[big] / truth.abs()[big]).max()) < 5e-6
    special = torch.tensor([[float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 6.0, -6.0, 1e30]])
    ops.bias_act(special, None, 1, got := torch.empty_like(special))
    want = F.gelu(special.double()).float()
    assert torch.isnan(got[0, 2])
    if ops.capability() in ("AVX512", "AVX2"):  # the limits (PyTorch's float32 GELU gives NaN for both)
        assert got[0, 0] == float("inf") and got[0, 1] == 0
    torch.testing.assert_close(got[0, 3:], want[0, 3:], atol=5e-7, rtol=0)


def test_bias_act():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 63, generator=g) * 3 + 1
    b = torch.randn(21, generator=g)
    out = torch.zeros(300, 84)
    ops.bias_act(x[:, :21], b, 1, out[:, 21:42])
    _close(out[:, 21:42], F.gelu(x[:, :21] + b))
    assert out[:, :21].abs().max() == 0 and out[:, 42:].abs().max() == 0  # writes only its columns
    ops.bias_act(x[:, 5:47], None, 0, out[:, :42])
    _close(out[:, :42], x[:, 5:47])


def test_rcca_stats_and_combine():
    g = torch.Generator().manual_seed(3)
    n, p, c = 2, 500, 42
    t = torch.randn(n * p, c, generator=g) * 0.5 + 3  # mean far from zero: the shifted sums must hold
    wd, bd = torch.randn(c, generator=g), 0.3
    gout, sums = torch.empty(n * p), torch.empty(n, 2, c, dtype=torch.float64)
    ops.rcca_stats(t, n, wd, bd, gout, sums)
    _close(gout, F.gelu(t @ wd + bd), rel=5e-6)
    tn = t.view(n, p, c).double()
    shift = tn[:, 0]
    mean = shift + sums[:, 0] / p
    var = sums[:, 1] / p - (sums[:, 0] / p) ** 2
    assert torch.allclose(mean, tn.mean(1), rtol=1e-6, atol=1e-6)
    assert torch.allclose(var, tn.var(1, unbiased=False), rtol=1e-4, atol=1e-7)
    z, sigma = torch.randn(n * p, c, generator=g), torch.randn(c, generator=g)
    for weight in (torch.randn(n, c, generator=g), torch.randn(n * p, c, generator=g)):  # per image, per pixel
        per_pixel = weight if weight.shape[0] == n * p else weight.repeat_interleave(p, 0)
        want = z + t * (sigma + per_pixel) - sigma * gout[:, None]
        got = z.clone()
        ops.rcca_combine(got, t, gout, sigma, weight, n)
        _close(got, want, rel=5e-6)


@pytest.mark.parametrize("h,w,c,heads", [(48, 48, 42, 3), (50, 50, 42, 3), (7, 9, 42, 3), (101, 77, 42, 3),
                                         (50, 61, 24, 3), (50, 50, 42, 1), (50, 50, 60, 1), (33, 20, 60, 4)])
def test_cell_gram_and_apply_match_per_cell_matmuls(h, w, c, heads):
    """Cells of every width (the TLC grid of an h x w map), including ones narrower than the kernel's 4-pixel
    groups: a group must never spill into the next cell. C = 42 (AGDN), 24 (AGDN-S) and generic widths; with
    heads, the gram's diagonal blocks only (zeros elsewhere)."""
    g = torch.Generator().manual_seed(h * w)
    n = 2
    qkv = torch.randn(n, h, w, 3 * c, generator=g)
    ry, row_seg, cx, col_seg, _, _ = fast._cell_layout(48, h, w, None)
    gram = torch.full((n, len(ry), len(cx), c, c), float("nan"))
    sq = torch.empty(n, len(ry), len(cx), 2 * c)
    flat = qkv.view(-1, 3 * c)
    ops.cell_gram(flat, n, h, w, c, row_seg, col_seg, len(ry), len(cx), gram, sq, heads)
    head = torch.arange(c) // (c // heads)
    blocks = (head[:, None] == head[None, :]).float()
    mats = torch.randn(n, len(ry), len(cx), c, c, generator=g)
    padded = torch.zeros(n, len(ry), len(cx), c, -(-c // 16) * 16)
    padded[..., :c] = mats
    z = torch.randn(n * h * w, c, generator=g)
    out = torch.empty_like(z)
    ops.cell_apply(flat[:, 2 * c :], z, padded, n, h, w, row_seg, col_seg, len(ry), len(cx), out)
    out, z = out.view(n, h, w, c), z.view(n, h, w, c)
    for i in range(n):
        for yi, (y0, y1) in enumerate(ry):
            for xi, (x0, x1) in enumerate(cx):
                cell = qkv[i, y0:y1, x0:x1].reshape(-1, 3 * c)
                want = (cell[:, :c].t() @ cell[:, c : 2 * c]) * blocks
                _close(gram[i, yi, xi], want, rel=1e-5, what=f"gram {yi},{xi}")
                _close(sq[i, yi, xi], cell[:, : 2 * c].square().sum(0), rel=1e-5, what=f"norms {yi},{xi}")
                want = z[i, y0:y1, x0:x1] + qkv[i, y0:y1, x0:x1, 2 * c :] @ mats[i, yi, xi]
                _close(out[i, y0:y1, x0:x1], want, rel=1e-5, what=f"apply {yi},{xi}")


@pytest.mark.parametrize("h,w,placement", [(128, 128, None), (50, 61, None), (30, 30, None),
                                           (96, 70, Placement((300, 200), (50, 61)))])
def test_cell_mats_matches_the_python_reference(agdn_x4, h, w, placement):
    """The per-cell attention matrices (window sums, normalisation, ReLU, heads, project_out folded, mean over
    covering windows) against `_cell_matrices`, from one gram of random q and k."""
    bw = fused._kernel_weights(agdn_x4, torch.zeros(1, 3, 8, 8))["blocks"][2]
    c = bw["proj"].shape[0]
    g = torch.Generator().manual_seed(h + w)
    n = 2
    ry, row_seg, cx, col_seg, to_windows, to_cells = fast._cell_layout(48, h, w, placement)
    qk = torch.randn(n * h * w, 2 * c, generator=g)
    gram = torch.empty(n, len(ry), len(cx), c, c)
    sq = torch.empty(n, len(ry), len(cx), 2 * c)
    ops.cell_gram(qk, n, h, w, c, row_seg, col_seg, len(ry), len(cx), gram, sq, network.HEADS)
    mats = torch.full((n, len(ry), len(cx), c, -(-c // 16) * 16), float("nan"))
    ops.cell_mats(gram, sq, to_windows, to_cells, bw["tau"], bw["proj"], network.HEADS, mats)
    assert bool((mats[..., c:] == 0).all()), "padding columns must be zeros"
    for i in range(n):
        want = fast._cell_matrices(bw, gram[i], sq[i], to_windows, to_cells)
        _close(mats[i, ..., :c], want, rel=1e-6, what=f"image {i}")


@pytest.mark.parametrize("h,w,placement", [(64, 64, None), (37, 53, None), (15, 15, None),
                                           (40, 46, Placement((130, 100), (12, 30)))])
def test_mvsa_and_rcca_match_the_eager_fast_path(agdn_x4, h, w, placement):
    """MVSA (coarse branch, resize, mask) and RCCA on the kernels vs the eager fast path, block 3 of AGDN x4."""
    x = torch.rand(1, 3, h, w)
    with torch.inference_mode():
        bw = fast._fast_weights(agdn_x4, x)["blocks"][2]
        kw = fused._kernel_weights(agdn_x4, x)["blocks"][2]
        blk = agdn_x4.B3
        z = torch.randn(h * w, 42) * 0.5
        eager = fast._fast_mvsa(bw, blk.esa.body[0], z + bw["c5_b"], 1, h, w, placement)
        on_kernels = z.clone()
        fused._kernel_mvsa(ops, kw, on_kernels, 1, h, w, placement, fast._Workspace(z))
        _close(on_kernels, eager, rel=1e-5, what="mvsa")
        eager = fast._fast_rcca(bw, blk.cca, eager.clone(), 1, h, w, placement)
        on_kernels = fused._kernel_rcca(ops, kw, blk.cca, on_kernels, 1, h, w, placement, fast._Workspace(z))
        _close(on_kernels, eager, rel=1e-5, what="rcca")


@pytest.fixture(scope="module")
def agdn_x4():
    from upscale import registry
    from upscale.weights import load_model, resolve_weights

    entry = registry.resolve("agdn", 4)
    return load_model(entry, resolve_weights(entry, None, offline=True))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, **env})


def test_disabled_kernels_fall_back_to_the_eager_path():
    done = _run("from upscale.models import kernels; print(kernels.load() is None, kernels.status())",
                UPSCALE_CPU_KERNELS="0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True PyTorch ops (disabled by UPSCALE_CPU_KERNELS)")


def test_a_cpu_without_avx2_takes_the_eager_path_without_building(tmp_path):
    code = ("import numpy as np; from upscale.models import kernels; kernels._has_avx2 = lambda: False;"
            "from upscale.api import load_model, upscale_image; m = load_model('agdn', 2);"
            "out = upscale_image(m, (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8));"
            "print(kernels.load() is None, kernels.status(), out.shape)")
    done = _run(code, UPSCALE_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True PyTorch ops (the CPU has no AVX2") and "(40, 48, 3)" in done.stdout
    assert done.stderr == "" and not list((tmp_path / "kernels").rglob("*.so"))


def test_the_build_targets_what_the_setting_and_the_cpu_say():
    flags = kernels._cpu_flags()
    if os.environ.get("UPSCALE_CPU_KERNELS", "").lower() == "avx2":
        expected = "AVX2"
    else:
        expected = "AVX512" if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(flags) else "AVX2"
    assert ops.capability() == expected


@pytest.mark.skipif(os.environ.get("UPSCALE_CPU_KERNELS", "").lower() == "avx2", reason="this run is the AVX2 build")
def test_the_avx2_build_matches_the_eager_path_too():
    # CPUs without AVX-512 (most desktops and laptops) run the AVX2 code; build it here and run this file's op
    # checks, the golden cases and the fast-vs-straight checks of the three families on it, in a child process
    # (the build is cached like the native one)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           "tests/models/test_kernels.py", "tests/models/test_agdn.py", "tests/models/test_esc.py",
                           "tests/models/test_asid.py", "-k", "not avx2_build"],
                          capture_output=True, text=True, cwd=REPO, timeout=1800,
                          env={**os.environ, "UPSCALE_CPU_KERNELS": "avx2"})
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in tail and " failed" not in tail, tail


def test_a_failed_build_falls_back_with_one_line(tmp_path):
    """A compiler that fails: one stderr line, the eager path, the same output, nothing cached."""
    code = ("import torch; from upscale.models import kernels; from upscale.api import load_model, upscale_image;"
            "import numpy as np; m = load_model('agdn', 2); img = (np.random.default_rng(0).random((20, 24, 3))"
            " * 255).astype(np.uint8); out = upscale_image(m, img); print(kernels.status()); print(out.shape)")
    done = _run(code, CXX="/bin/false", UPSCALE_CACHE_DIR=str(tmp_path), PATH="/nonexistent")
    assert done.returncode == 0, done.stderr
    assert "build failed" in done.stdout and "(40, 48, 3)" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if "fused CPU kernels unavailable" in line]
    assert len(warnings) == 1
    assert not list((tmp_path / "kernels").rglob("*.so"))


def test_dwconv_side_job_in_the_same_pass():
    """The pointwise job AGDN's distillation hands to the conv: side_out = GELU(side_in + bias)."""
    g = torch.Generator().manual_seed(4)
    n, h, w = 1, 9, 14
    both = torch.randn(n * h * w, 63, generator=g)  # [c_d output (21) | c_r pointwise output (42)]
    weight, bias, side_bias = torch.randn(42, 1, 3, 3, generator=g), torch.randn(42, generator=g), torch.randn(21)
    out, distilled = torch.empty(n * h * w, 42), torch.zeros(n * h * w, 84)
    ops.dwconv3x3(both[:, 21:], n, h, w, kernels.depthwise_taps(weight), bias, 1, True, None, 1, 0, out,
                  both[:, :21], side_bias, distilled[:, 21:42])
    _close(out, F.gelu(_rows(_eager_dw(both[:, 21:], n, h, w, weight, bias, 1, True))))
    _close(distilled[:, 21:42], F.gelu(both[:, :21] + side_bias))
    assert distilled[:, :21].abs().max() == 0 and distilled[:, 42:].abs().max() == 0


@pytest.mark.parametrize("p,c", [(64, 42), (67, 42), (5, 24), (259, 16), (30, 70)])
def test_rcca_combine_and_cell_apply_with_a_residual_and_the_sum_kept(p, c):
    """rcca_combine in place; cell_apply adding a residual to out and writing the sum before it back into z
    (AGDN's attention pass: z goes on to the FFN, out is the block's output); pixel counts that leave a partial
    group of four, channel counts of 1-4 vectors and more."""
    g = torch.Generator().manual_seed(5)
    z, t, gv = torch.randn(p, c, generator=g), torch.randn(p, c, generator=g), torch.randn(p, generator=g)
    sigma, wgt = torch.randn(c, generator=g), torch.randn(1, c, generator=g)
    want = z + t * (sigma + wgt) - sigma * gv[:, None]
    ops.rcca_combine(z, t, gv, sigma, wgt, 1)
    _close(z, want, rel=5e-6)
    h, w = 1, p
    v, u = torch.randn(p, c, generator=g), torch.randn(p, c, generator=g)
    mats = torch.zeros(1, 1, 1, c, -(-c // 16) * 16)
    mats[..., :c] = torch.randn(c, c, generator=g)
    out = torch.empty(p, c)
    attn = z + v @ mats[0, 0, 0, :, :c]
    ops.cell_apply(v, z, mats, 1, h, w, torch.zeros(h, dtype=torch.long), torch.zeros(w, dtype=torch.long), 1, 1,
                   out, u, z)
    _close(z, attn, rel=5e-6)
    _close(out, attn + u, rel=5e-6)


@pytest.mark.parametrize("c", [1, 5, 8, 16, 21, 24, 42, 56, 126, 168])
@pytest.mark.parametrize("p,k", [(1, 3), (7, 42), (130, 42), (301, 84)])
def test_gemm_matches_matmul_and_writes_only_its_columns(c, p, k):
    """Every column-block split (AVX-512: up to 6 vectors of 16; AVX2: up to 3 of 8), partial last vectors,
    single-pixel tails, plain and accumulating; the output is a slice of a wider matrix whose other columns
    must keep their NaNs."""
    g = torch.Generator().manual_seed(c * 1000 + p + k)
    cm = -(-c // 16) * 16
    x = torch.randn(p, k + 3, generator=g)[:, 2 : 2 + k]
    w = torch.zeros(k, cm)
    w[:, :c] = torch.randn(k, c, generator=g)
    w[:, c:] = float("nan")  # padding columns are never read into the output
    wide = torch.full((p, c + 9), float("nan"))
    out = wide[:, 4 : 4 + c]
    ops.gemm(x, w, out, False)
    want = x.double() @ w[:, :c].double()
    _close(out, want, rel=2e-6 * k ** 0.5, what="plain")
    ops.gemm(x, w, out, True)
    _close(out, 2 * want, rel=4e-6 * k ** 0.5, what="accumulate")
    assert torch.isnan(wide[:, :4]).all() and torch.isnan(wide[:, 4 + c :]).all()


@pytest.mark.parametrize("n,h,w,cm,off,c,mode,reflect,side", [
    (1, 20, 23, 64, 21, 42, 0, True, 21), (2, 9, 7, 128, 0, 126, 0, False, 0), (1, 11, 13, 176, 0, 168, 1, False, 0),
    (1, 1, 5, 64, 21, 42, 0, True, 21), (3, 2, 2, 64, 21, 42, 0, True, 21),
])
def test_pw_dwconv_equals_gemm_then_dwconv(n, h, w, cm, off, c, mode, reflect, side):
    """The 1x1 conv computed row by row inside the depthwise kernel gives the same values as the GEMM on the
    whole map followed by dwconv3x3 (including the side job reading the GEMM's first columns)."""
    g = torch.Generator().manual_seed(n * h * w + cm)
    x, wpw = torch.randn(n * h * w, 42, generator=g), torch.randn(42, cm, generator=g)
    weight = kernels.depthwise_taps(torch.randn(c, 1, 3, 3, generator=g))
    bias = torch.randn(c, generator=g) if mode == 0 else None
    res = torch.randn(n * h * w, c, generator=g) if mode == 0 else None
    out_c = c if mode == 0 else c // 2
    side_bias = torch.randn(side, generator=g) if side else None
    want, got = torch.empty(n * h * w, out_c), torch.empty(n * h * w, out_c)
    want_side = torch.empty(n * h * w, side) if side else None
    got_side = torch.empty(n * h * w, side) if side else None
    y = x @ wpw
    act = 1 if mode == 0 else 0
    ops.dwconv3x3(y[:, off : off + c], n, h, w, weight, bias, 1, reflect, res, act, mode, want,
                  y[:, :side] if side else None, side_bias, want_side)
    ops.pw_dwconv(x, n, h, w, wpw, off, weight, bias, reflect, res, act, mode, got, side_bias, got_side)
    _close(got, want, rel=1e-5)
    if side:
        _close(got_side, want_side, rel=1e-5)


@pytest.mark.parametrize("w", [177, 179, 200, 400, 701])
@pytest.mark.parametrize("mode", [0, 1])
def test_pw_dwconv_in_column_strips_gives_the_bits_of_gemm_then_dwconv(w, mode):
    """A map wider than a strip (176 columns; 179 and up are cut) runs strip by strip, each over one more column
    on each inner side: the same bits as the kernels' GEMM over the whole map, then dwconv3x3 (mode 0 with the
    residual, GELU and side job, reflect padding; mode 1, the gate, with a LayerNorm prologue and the epilogue
    GEMM), at 1-3 threads (rows claimed from other threads' shares)."""
    g = torch.Generator().manual_seed(w + mode)
    n, h, k = 2, 5, 42
    c, cm = (42, 64) if mode == 0 else (168, 176)
    x = torch.randn(n * h * w, k, generator=g)
    wpw = torch.randn(k, cm, generator=g) / k**0.5
    taps = kernels.depthwise_taps(torch.randn(c, 1, 3, 3, generator=g))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            if mode == 0:
                off, side = 21, 21
                bias, res, side_bias = (torch.randn(c, generator=g), torch.randn(n * h * w, c, generator=g),
                                        torch.randn(side, generator=g))
                y = torch.empty(n * h * w, cm)
                ops.gemm(x, wpw, y, False)
                want, want_side = torch.empty(n * h * w, c), torch.empty(n * h * w, side)
                ops.dwconv3x3(y[:, off : off + c], n, h, w, taps, bias, 1, True, res, 1, 0, want, y[:, :side],
                              side_bias, want_side)
                got, got_side = torch.full_like(want, float("nan")), torch.full_like(want_side, float("nan"))
                ops.pw_dwconv(x, n, h, w, wpw, off, taps, bias, True, res, 1, 0, got, side_bias, got_side)
                assert torch.equal(got, want) and torch.equal(got_side, want_side), (w, threads)
            else:
                ln = (torch.randn(k, generator=g), torch.randn(k, generator=g), 1e-5)
                epi_w = torch.zeros(c // 2, 48)
                epi_w[:, :k] = torch.randn(c // 2, k, generator=g) / 9
                y = torch.empty(n * h * w, cm)
                ops.gemm(x, wpw, y, False, *ln)
                gated = torch.empty(n * h * w, c // 2)
                ops.dwconv3x3(y[:, :c], n, h, w, taps, None, 1, False, None, 0, 1, gated)
                start = torch.randn(n * h * w, k, generator=g)
                want, got = start.clone(), start.clone()
                ops.gemm(gated, epi_w, want, True)
                ops.pw_dwconv(x, n, h, w, wpw, 0, taps, None, False, None, 0, 1, x.new_empty(0, c // 2), None, None,
                              *ln, epi_w, got)
                assert torch.equal(got, want), (w, threads)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n,h,w", [(1, 100, 60), (1, 49, 49), (2, 64, 96), (1, 15, 130)])
def test_rcca_local_weight_matches_box_statistics(agdn_x4, n, h, w):
    """Local statistics (49 x 49 windows clipped at the border) and conv_du, against layers.box_mean and the
    module, with two threads: each thread's band of rows starts its sliding sums from scratch."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            kw = fused._kernel_weights(agdn_x4, torch.rand(1, 3, h, w))["blocks"][1]
            t = torch.randn(n * h * w, 42, generator=torch.Generator().manual_seed(h)) * 0.3 + 0.5
            want = fast._rows(agdn_x4.B2.cca.cca(fast._nhwc(t, n, h, w), local=True))
            got = torch.empty(n * h * w, 42)
            ops.rcca_local_weight(t, n, h, w, network.LOCAL_STATS_WINDOW, kw["du0_w"], kw["du0_b"], kw["du2_w"],
                                  kw["du2_b"], got)
    finally:
        torch.set_num_threads(previous)
    _close(got, want, rel=2e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rcca_local_gives_the_bits_of_the_dwconv_stats_weights_and_combine(agdn_x4, threads):
    """RCCA on a tile in one pass (t made into a ring of rows as the window slides, the output beside z): against
    dwconv3x3, rcca_stats' g, rcca_local_weight's weights and rcca_combine, bit for bit, on maps of 1-3 images
    down to one row or column and taller than the window, at 1-3 threads; z is left as it was."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for n, h, w in [(1, 1, 9), (2, 7, 1), (1, 49, 50), (3, 20, 33), (1, 130, 17)]:
                kw = fused._kernel_weights(agdn_x4, torch.rand(1, 3, 8, 8))["blocks"][4]
                z = torch.randn(n * h * w, 42, generator=torch.Generator().manual_seed(h * w + threads))
                t = torch.empty(n * h * w, 42)
                ops.dwconv3x3(z, n, h, w, kw["cca_dw"], kw["cca_dwb"], 1, False, None, 1, 0, t)
                g, weight = torch.empty(n * h * w), torch.empty(n * h * w, 42)
                ops.rcca_stats(t, n, kw["dec_w"], kw["dec_b"], g, torch.empty(n, 2, 42, dtype=torch.float64))
                ops.rcca_local_weight(t, n, h, w, network.LOCAL_STATS_WINDOW, kw["du0_w"], kw["du0_b"], kw["du2_w"],
                                      kw["du2_b"], weight)
                want = z.clone()
                ops.rcca_combine(want, t, g, kw["sigma"], weight, n)
                got, z_before = torch.full_like(z, float("nan")), z.clone()
                ops.rcca_local(z, n, h, w, network.LOCAL_STATS_WINDOW, kw["cca_dw"], kw["cca_dwb"], kw["du0_w"],
                               kw["du0_b"], kw["du2_w"], kw["du2_b"], kw["dec_w"], kw["dec_b"], kw["sigma"], got)
                assert not torch.equal(want, z) and torch.equal(got, want), (n, h, w)
                assert torch.equal(z, z_before)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("n,h,w,c,s", [(1, 7, 9, 3, 4), (2, 5, 6, 3, 2), (1, 4, 3, 3, 3), (1, 1, 1, 2, 4)])
def test_pixel_shuffle_from_channels_last_rows(n, h, w, c, s):
    """The upsampler's PixelShuffle read from (pixels, C*s*s) rows equals F.pixel_shuffle on the NCHW map."""
    g = torch.Generator().manual_seed(h * w * s)
    x = torch.randn(n, c * s * s, h, w, generator=g)
    out = torch.full((n, c, h * s, w * s), float("nan"))
    ops.pixel_shuffle(x.permute(0, 2, 3, 1).contiguous().view(-1, c * s * s), n, h, w, s, out)
    assert torch.equal(out, F.pixel_shuffle(x, s))


@pytest.mark.parametrize("n,h,w,c,s", [(1, 7, 9, 3, 4), (2, 5, 6, 3, 2), (1, 9, 3, 3, 3)])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_pixel_shuffle_of_row_bands_fills_a_taller_output(n, h, w, c, s, rows):
    """Bands of `rows` rows shuffled into their place (`row0`) of the whole output give the whole shuffle; a band
    past the output's end is refused."""
    g = torch.Generator().manual_seed(h * w * s + rows)
    x = torch.randn(n, c * s * s, h, w, generator=g)
    out = torch.full((n, c, h * s, w * s), float("nan"))
    for i in range(n):
        for y0 in range(0, h, rows):
            y1 = min(h, y0 + rows)
            band = x[i : i + 1, :, y0:y1].permute(0, 2, 3, 1).contiguous().view(-1, c * s * s)
            ops.pixel_shuffle(band, 1, y1 - y0, w, s, out[i : i + 1], y0)
    assert torch.equal(out, F.pixel_shuffle(x, s))
    with pytest.raises(RuntimeError, match="band"):
        ops.pixel_shuffle(x[:1, :, :2].permute(0, 2, 3, 1).contiguous().view(-1, c * s * s), 1, 2, w, s, out[:1],
                          h - 1)


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_row_sharing_gives_every_row_once_at_any_thread_count(threads):
    """The kernels share rows between threads at run time (a thread that finishes early takes rows from the end
    of another's share); every row must be computed exactly once whatever the thread count, and the results
    must not depend on it: bit-identical, the grams included (their partial sums are per unit of rows fixed by
    the layout, not per thread)."""
    g = torch.Generator().manual_seed(threads)
    n, h, w, c = 2, 23, 17, 42
    x, wpw = torch.randn(n * h * w, c, generator=g), torch.randn(c, 64, generator=g)
    weight, bias = kernels.depthwise_taps(torch.randn(c, 1, 3, 3, generator=g)), torch.randn(c, generator=g)
    res = torch.randn(n * h * w, c, generator=g)
    ry, row_seg, cx, col_seg, _, _ = fast._cell_layout(8, h, w, None)
    qk = torch.randn(n * h * w, 2 * c, generator=g)

    def run():
        pw, dw = torch.full((n * h * w, c), float("nan")), torch.full((n * h * w, c), float("nan"))
        mm = torch.ones(n * h * w, 50)  # accumulated into: a row done twice would show
        ops.pw_dwconv(x, n, h, w, wpw, 21, weight, bias, True, res, 1, 0, pw)
        ops.dwconv3x3(x, n, h, w, weight, bias, 1, False, res, 1, 0, dw)
        ops.gemm(x, wpw, mm, True)
        gram, sq = torch.empty(n, len(ry), len(cx), c, c), torch.empty(n, len(ry), len(cx), 2 * c)
        ops.cell_gram(qk, n, h, w, c, row_seg, col_seg, len(ry), len(cx), gram, sq, network.HEADS)
        return pw, dw, mm, gram, sq

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = run()
        torch.set_num_threads(threads)
        got = run()
    finally:
        torch.set_num_threads(before)
    for a, b, what in zip(got, want, ("pw_dwconv", "dwconv3x3", "gemm", "gram", "squared norms")):
        assert torch.equal(a, b), what


def test_the_forward_gives_the_same_bits_on_every_run_and_thread_count(agdn_x4):
    """Reproducible output: the same input gives the same bits run after run (threads share rows at run time,
    so a reduction summed per thread would differ from run to run) and at any thread count."""
    x = torch.rand(1, 3, 61, 75, generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(2)
            first = agdn_x4(x)
            runs = [agdn_x4(x) for _ in range(3)]
            torch.set_num_threads(1)
            runs.append(agdn_x4(x))
            torch.set_num_threads(3)
            runs.append(agdn_x4(x))
    finally:
        torch.set_num_threads(before)
    for i, y in enumerate(runs):
        assert torch.equal(y, first), f"run {i}: {int((y != first).sum())} values differ"


# -- ESC's kernels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window,heads,windows", [(16, 2, 3), (32, 4, 4), (48, 12, 1), (32, 3, 2)])
def test_window_attention_matches_softmax_with_the_relative_bias(window, heads, windows):
    from upscale.models.esc import network as esc

    g = torch.Generator().manual_seed(window + heads)
    L = window * window
    q, k, v = (torch.randn(windows, heads, L, 16, generator=g) for _ in range(3))
    table = torch.randn(heads, (2 * window - 1) ** 2, generator=g)
    want = esc.window_attention(q, k, v, table, window, "naive")
    out = torch.full((windows * heads, L, 16), float("nan"))
    ops.window_attention(q.reshape(-1, L, 16), k.reshape(-1, L, 16).transpose(1, 2).contiguous(),
                         v.reshape(-1, L, 16), table, window, 0.25, out)
    _close(out.view_as(want), want, rel=5e-6, what="attention")  # sums over up to 2304 keys


@pytest.mark.parametrize("n,c,h,w,size", [
    (1, 16, 40, 37, 13), (2, 16, 9, 5, 13), (1, 48, 20, 24, 13), (1, 32, 3, 70, 7), (1, 16, 1, 1, 13),
    (1, 16, 12, 12, 3),
])
def test_sym_conv_equals_the_dense_conv_of_a_symmetric_kernel(n, c, h, w, size):
    from upscale.models.esc import fast as esc_fast
    from upscale.models.esc.network import d4_symmetrize

    g = torch.Generator().manual_seed(c * h + w)
    kernel = d4_symmetrize(torch.randn(c, c, size, size, generator=g) / size)
    x = torch.randn(n, c, h, w, generator=g)
    want = F.conv2d(x, kernel, padding=size // 2)
    wide = torch.randn(n * h * w, c + 8, generator=g)
    wide[:, 3 : 3 + c] = _rows(x)  # a column slice of a wider map, as the model passes it
    out = torch.full((n * h * w, c), float("nan"))
    ops.sym_conv(wide[:, 3 : 3 + c], n, h, w, c, size, esc_fast.orbit_weight(kernel), out)
    _close(out, _rows(want), rel=4e-6, what="sym_conv")


# -- ASID's kernels --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("n,h,w,d", [(1, 16, 24, 36), (2, 8, 8, 24), (1, 40, 16, 12), (1, 8, 32, 48), (1, 16, 16, 5)])
def test_token_attention_matches_grouped_softmax(grid, n, h, w, d):
    from upscale.models.asid import network as asid

    g = torch.Generator().manual_seed(n * h + w + d)
    qkv = torch.randn(n * h * w, 3 * d + 4, generator=g)[:, 2:]  # a column slice of a wider map
    bias = torch.randn(64, 64, generator=g)
    scale = d**-0.5
    tokens = asid._group_tokens(qkv.reshape(n, h, w, -1).permute(0, 3, 1, 2), grid)
    q, k, v = tokens[..., :d], tokens[..., d : 2 * d], tokens[..., 2 * d : 3 * d]
    attn = ((q * scale) @ k.transpose(1, 2) + bias).softmax(dim=-1)
    want = asid._ungroup_tokens(attn @ v, (n, d, h, w), grid)
    groups = n * h * w // 64
    out = torch.full((n * h * w, d), float("nan"))
    got_attn = torch.empty(groups, 64, 64)
    ops.token_attention(qkv, n, h, w, grid, d, 0, d, 2 * d, bias, scale, None, got_attn, out)
    _close(got_attn, attn, what="attention map")
    _close(out, _rows(want), what="computed")
    shared = torch.full((n * h * w, d), float("nan"))  # a given map applied to other values (ASID's later groups)
    vals = torch.randn(n * h * w, d, generator=g)
    ops.token_attention(vals, n, h, w, grid, d, 0, 0, 0, None, 1.0, attn.contiguous(), None, shared)
    vt = asid._group_tokens(vals.reshape(n, h, w, d).permute(0, 3, 1, 2), grid)
    _close(shared, _rows(asid._ungroup_tokens(attn @ vt, (n, d, h, w), grid)), what="shared")
    # accumulate: out += the sum (the residual update), into a column slice of a wider map whose other columns
    # stay as they were; the same bits as the sum added afterwards
    wide = torch.randn(n * h * w, d + 3, generator=g)
    before = wide.clone()
    ops.token_attention(vals, n, h, w, grid, d, 0, 0, 0, None, 1.0, attn.contiguous(), None, wide[:, 1 : d + 1],
                        True)
    assert torch.equal(wide[:, 1 : d + 1], before[:, 1 : d + 1] + shared)
    assert torch.equal(wide[:, [0, d + 1, d + 2]], before[:, [0, d + 1, d + 2]])
    mixed = before.clone()
    ops.token_attention(qkv, n, h, w, grid, d, 0, d, 2 * d, bias, scale, None, None, mixed[:, 1 : d + 1], True)
    assert torch.equal(mixed[:, 1 : d + 1], before[:, 1 : d + 1] + out)


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("widths,heights", [((150, 64, 63, 1), (5, 1, 20)), ((7, 9, 130), (16, 17)), ((64,), (3,))])
def test_cell_gram_over_runs_longer_and_shorter_than_its_blocks(widths, heights, heads):
    """cell_gram sums about 64 pixels per block: whole rows of a short run, parts of one row of a long one
    (150 = 64 + 64 + 22); cells as given (rows and columns of any width), against per-cell matmuls."""
    c, n = 42, 2
    h, w = sum(heights), sum(widths)
    g = torch.Generator().manual_seed(h * w + heads)
    qk = torch.randn(n * h * w, 2 * c + 3, generator=g)[:, :2 * c]  # a column slice of a wider map
    rows = torch.repeat_interleave(torch.arange(len(heights)), torch.tensor(heights))
    cols = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
    gram = torch.full((n, len(heights), len(widths), c, c), float("nan"))
    sq = torch.empty(n, len(heights), len(widths), 2 * c)
    ops.cell_gram(qk, n, h, w, c, rows, cols, len(heights), len(widths), gram, sq, heads)
    head = torch.arange(c) // (c // heads)
    blocks = (head[:, None] == head[None, :]).float()
    maps = qk.view(n, h, w, 2 * c)
    for i in range(n):
        for yi in range(len(heights)):
            for xi in range(len(widths)):
                cell = maps[i, rows == yi][:, cols == xi].reshape(-1, 2 * c)
                _close(gram[i, yi, xi], (cell[:, :c].t() @ cell[:, c:]) * blocks, rel=1e-5, what=f"gram {yi},{xi}")
                _close(sq[i, yi, xi], cell.square().sum(0), rel=1e-5, what=f"norms {yi},{xi}")


def _regrouped(x, n, h, w, p, back=False):
    """(n*h*w, c) rows -> the map regrouped by offset in p x p windows (pixel (p*i + u, p*j + v) at
    (u*h/p + i, v*w/p + j)); `back` undoes it."""
    c = x.shape[1]
    if back:
        t = x.view(n, p, h // p, p, w // p, c).permute(0, 2, 1, 4, 3, 5)
    else:
        t = x.view(n, h // p, p, w // p, p, c).permute(0, 2, 1, 4, 3, 5)
    return t.reshape(-1, c)


@pytest.mark.parametrize("p,n,h,w,c", [(8, 1, 64, 64, 48), (8, 2, 16, 40, 48), (8, 1, 8, 24, 24), (4, 1, 12, 20, 42),
                                       (2, 2, 6, 10, 60), (8, 1, 72, 8, 16)])
@pytest.mark.parametrize("cells", ["blocks", "finer", "across"])
def test_cell_kernels_read_a_map_regrouped_by_offset_in_place(p, n, h, w, c, cells):
    """cell_gram and cell_apply with `offsets` = p read the map as if regrouped by offset in p x p windows (ASID's
    grid channel attention): the same as on a regrouped copy, with out written at the pixels' own places. Cells
    as the blocks of one offset (ASID), finer than the blocks, and across the blocks' edges."""
    g = torch.Generator().manual_seed(p * h + w + c)
    qkv = torch.randn(n * h * w, 3 * c + 2, generator=g)[:, 1:-1]  # a column slice of a wider map
    if cells == "blocks":
        rows, cols = torch.arange(h) // (h // p), torch.arange(w) // (w // p)
    elif cells == "finer":
        rows, cols = torch.arange(h) // max(1, h // p // 2), torch.arange(w) // max(1, w // p // 3)
    else:
        rows, cols = torch.arange(h) * 3 // h, torch.arange(w) * 2 // w
    ny, nx = int(rows[-1]) + 1, int(cols[-1]) + 1
    cp = -(-c // 16) * 16
    mats = torch.randn(n, ny, nx, c, cp, generator=g)
    z = torch.randn(n * h * w, c, generator=g)
    results = []
    for offsets, src, acc in ((p, qkv, z), (0, _regrouped(qkv, n, h, w, p), _regrouped(z, n, h, w, p))):
        gram = torch.full((n, ny, nx, c, c), float("nan"))
        sq = torch.full((n, ny, nx, 2 * c), float("nan"))
        ops.cell_gram(src, n, h, w, c, rows, cols, ny, nx, gram, sq, 1, offsets)
        out = torch.full((n * h * w, c), float("nan"))
        ops.cell_apply(src[:, 2 * c :], acc, mats, n, h, w, rows, cols, ny, nx, out, None, None, offsets)
        results.append((gram, sq, out if offsets else _regrouped(out, n, h, w, p, back=True)))
    for got, want, what in zip(results[0], results[1], ("gram", "norms", "apply")):
        _close(got, want, rel=1e-5, what=what)


@pytest.mark.parametrize("mode,c", [(1, 168), (1, 48), (0, 42), (0, 21)])
@pytest.mark.parametrize("n,h,w", [(1, 9, 13), (2, 5, 3), (1, 1, 40)])
def test_pw_dwconv_epilogue_equals_its_gemm_after(mode, c, n, h, w):
    """pw_dwconv's epilogue (each output row times epi_w, added to epi_out: AGDN's FFN project_out) gives what
    a separate accumulating GEMM over the whole output gives, bit for bit, with and without a LayerNorm prologue;
    a residual or a side output with it is refused."""
    g = torch.Generator().manual_seed(c + 7 * h + w)
    k, co = 42, (c if mode == 0 else c // 2)
    x = torch.randn(n * h * w, k, generator=g)
    wpw = torch.randn(k, -(-c // 16) * 16, generator=g)
    taps = torch.randn(9, c + 16, generator=g)
    epi_w = torch.zeros(co, 48)
    epi_w[:, :42] = torch.randn(co, 42, generator=g)
    for ln in ((), (torch.randn(k, generator=g), torch.randn(k, generator=g), 1e-5)):
        start = torch.randn(n * h * w, 42, generator=g)
        mid = torch.empty(n * h * w, co)
        ops.pw_dwconv(x, n, h, w, wpw, 0, taps, None, False, None, 0, mode, mid, None, None, *ln)
        want = start.clone()
        ops.gemm(mid, epi_w, want, True)
        got = start.clone()
        ops.pw_dwconv(x, n, h, w, wpw, 0, taps, None, False, None, 0, mode, x.new_empty(0, co), None, None,
                      *(ln or (None, None, 0.0)), epi_w, got)
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="epilogue"):
        ops.pw_dwconv(x, n, h, w, wpw, 0, taps, None, False, x[:, :co], 0, 0, x.new_empty(0, co), None, None,
                      None, None, 0.0, epi_w, torch.zeros(n * h * w, 42))


@pytest.mark.parametrize("k,c", [(48, 144), (36, 40), (12, 48), (64, 192), (42, 126), (42, 168), (80, 32)])
def test_gemm_and_pw_dwconv_with_a_layer_norm_prologue(k, c):
    g = torch.Generator().manual_seed(k + c)
    n, h, w = 2, 9, 13
    x = torch.randn(n * h * w, k + 3, generator=g)[:, 1 : 1 + k] * 3 + 1
    weight, bias = torch.randn(k, generator=g), torch.randn(k, generator=g)
    normed = F.layer_norm(x, (k,), weight, bias, 1e-6)
    wm = torch.randn(k, -(-c // 16) * 16, generator=g)
    want, got = torch.empty(x.shape[0], c), torch.empty(x.shape[0], c)
    ops.gemm(normed.contiguous(), wm, want, False)
    ops.gemm(x, wm, got, False, weight, bias, 1e-6)
    _close(got, want, rel=5e-6, what="gemm")
    taps = torch.randn(9, c + 16, generator=g)
    ops.pw_dwconv(normed.contiguous(), n, h, w, wm, 0, taps, None, False, None, 0, 0, want)
    ops.pw_dwconv(x, n, h, w, wm, 0, taps, None, False, None, 0, 0, got, None, None, weight, bias, 1e-6)
    _close(got, want, rel=5e-6, what="pw_dwconv")


def _distill_weights(c: int, seed: int) -> dict:
    """Random weights in the layout `fused._kernel_block_weights` gives the distillation (C channels, C/2 distilled)."""
    g = torch.Generator().manual_seed(seed)
    dc = c // 2
    wt = {"dc": dc, "c4_dw": kernels.depthwise_taps(torch.randn(c, 1, 3, 3, generator=g) / 3),
          "c4_b": torch.randn(dc, generator=g), "c5_wt": kernels.pad_columns(torch.randn(2 * c, c, generator=g) / c)}
    for k in (1, 2, 3):
        wt[f"dr{k}"] = kernels.pad_columns(torch.randn(c, dc + c, generator=g) / c**0.5)
        wt[f"r{k}_dw"] = kernels.depthwise_taps(torch.randn(c, 1, 3, 3, generator=g) / 3)
        wt[f"r{k}_dwb"], wt[f"d{k}_b"] = torch.randn(c, generator=g), torch.randn(dc, generator=g)
    return wt


@pytest.mark.parametrize("c", [42, 16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_distill_chain_gives_the_bits_of_its_separate_passes(c, threads):
    # one pass down the map, each stage a row behind the last, shares of rows per thread recomputing three rows
    # above them: against pw_dwconv x 3, dwconv3x3 (c4) and gemm (c5) on whole maps, bit for bit, on maps of
    # 1-3 images from 1 row (reflect of a single row) up to more rows than the threads' shares have halo; and in
    # column strips (`strip`, halo 4 on inner sides): from strips as narrow as their halo to one strip that
    # a width just over `strip` still keeps whole
    wt, dc = _distill_weights(c, c + threads), c // 2
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    cases = [(1, 1, 5, 0), (1, 2, 3, 0), (1, 3, 17, 0), (2, 5, 9, 0), (1, 7, 33, 0), (3, 13, 40, 0), (2, 33, 65, 0),
             (1, 70, 8, 0), (1, 9, 65, 4), (2, 6, 40, 7), (1, 17, 33, 16), (1, 5, 24, 16), (1, 4, 25, 16),
             (1, 3, 400, 0)]
    try:
        for n, h, w, strip in cases:
            u = torch.randn(n * h * w, c, generator=torch.Generator().manual_seed(h * w))
            distilled, r = torch.zeros(n * h * w, 2 * c), u
            for k in (1, 2, 3):
                r_next = torch.empty(n * h * w, c)
                ops.pw_dwconv(r, n, h, w, wt[f"dr{k}"], dc, wt[f"r{k}_dw"], wt[f"r{k}_dwb"], True, r, 1, 0, r_next,
                              wt[f"d{k}_b"], distilled[:, (k - 1) * dc : k * dc])
                r = r_next
            ops.dwconv3x3(r, n, h, w, wt["c4_dw"], wt["c4_b"], 1, False, None, 1, 2, distilled[:, 3 * dc :])
            want = torch.empty(n * h * w, c)
            ops.gemm(distilled, wt["c5_wt"], want, False)
            got = torch.full((n * h * w, c), float("nan"))
            ops.distill_chain(u, n, h, w, [wt[f"dr{k}"] for k in (1, 2, 3)], dc, [wt[f"r{k}_dw"] for k in (1, 2, 3)],
                              [wt[f"r{k}_dwb"] for k in (1, 2, 3)], [wt[f"d{k}_b"] for k in (1, 2, 3)], wt["c4_dw"],
                              wt["c4_b"], wt["c5_wt"], got, strip)
            assert torch.isfinite(want).all() and torch.equal(got, want), (n, h, w, strip)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("c,heads", [(42, network.HEADS), (24, network.HEADS), (16, 1)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_qkv_gram_gives_the_bits_of_pw_dwconv_then_cell_gram(c, heads, threads):
    # q|k|v made and summed unit by unit in a thread's buffer: against the qkv map of pw_dwconv and cell_gram
    # on it, bit for bit, with and without the LayerNorm, on 1-3 images, maps narrower and shorter than a cell
    # or a unit (16 rows), wider than a column strip, and a photo tile's cells (placement)
    g = torch.Generator().manual_seed(c * threads)
    wm = kernels.pad_columns(torch.randn(c, 3 * c, generator=g) / c**0.5)
    taps = kernels.depthwise_taps(torch.randn(3 * c, 1, 3, 3, generator=g) / 3)
    ln = (torch.randn(c, generator=g), torch.randn(c, generator=g), 1e-5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, h, w, placement in [(1, 1, 5, None), (1, 3, 17, None), (2, 17, 9, None), (3, 40, 33, None),
                                   (1, 50, 61, None), (2, 70, 8, None), (1, 64, 56, Placement((300, 200), (48, 96))),
                                   # wider than a column strip (176): cut where a cell ends
                                   (2, 9, 190, None), (1, 20, 400, None), (1, 18, 700, Placement((300, 1400), (48, 96)))]:
            x = torch.randn(n * h * w, c, generator=g)
            ry, row_seg, cx, col_seg, _, _ = fast._cell_layout(48, h, w, placement)
            cells = (n, len(ry), len(cx))
            for norm in ((None, None, 0.0), ln):
                qkv = torch.empty(n * h * w, 3 * c)
                ops.pw_dwconv(x, n, h, w, wm, 0, taps, None, False, None, 0, 0, qkv, None, None, *norm)
                gram, sq = torch.empty(*cells, c, c), torch.empty(*cells, 2 * c)
                ops.cell_gram(qkv, n, h, w, c, row_seg, col_seg, len(ry), len(cx), gram, sq, heads)
                v = torch.full((n * h * w, c), float("nan"))
                got_gram, got_sq = torch.full_like(gram, float("nan")), torch.full_like(sq, float("nan"))
                ops.qkv_gram(x, n, h, w, wm, taps, *norm, c, row_seg, col_seg, len(ry), len(cx), heads, v, got_gram,
                             got_sq)
                what = (n, h, w, norm[0] is not None)
                assert torch.isfinite(gram).all() and torch.equal(got_gram, gram), what
                assert torch.equal(got_sq, sq) and torch.equal(v, qkv[:, 2 * c :]), what
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_mvsa_head_gives_the_bits_of_gemm_then_the_stride_2_dwconv(agdn_x4, threads):
    # MVSA's 1x1 GEMM and its branches' stride-2 depthwise conv (reflect) in one pass, its GEMM rows in a ring:
    # against gemm and dwconv3x3 on the whole map, bit for bit, on 1-3 images with odd and even sides, down to
    # 2 x 2 (the smallest map the reflect padding allows)
    kw = fused._kernel_weights(agdn_x4, torch.rand(1, 3, 8, 8))["blocks"][2]
    f = kw["cf_b"].shape[0]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, h, w in [(1, 2, 2), (2, 3, 5), (1, 7, 16), (3, 20, 33), (1, 51, 40), (2, 64, 17)]:
            z = torch.randn(n * h * w, 42, generator=torch.Generator().manual_seed(h * w + threads))
            cs = torch.empty(n * h * w, 5 * f)
            ops.gemm(z, kw["mvsa_wt"], cs, False)
            h2, w2 = (h + 1) // 2, (w + 1) // 2
            want = torch.empty(n * h2 * w2, 4 * f)
            ops.dwconv3x3(cs[:, f:], n, h, w, kw["s2_dw"], kw["s2_dwb"], 2, True, None, 0, 0, want)
            cf, s2 = torch.full((n * h * w, f), float("nan")), torch.full_like(want, float("nan"))
            ops.mvsa_head(z, n, h, w, kw["mvsa_wt"], f, kw["s2_dw"], kw["s2_dwb"], cf, s2)
            assert torch.equal(cf, cs[:, :f]) and torch.equal(s2, want), (n, h, w)
    finally:
        torch.set_num_threads(before)
