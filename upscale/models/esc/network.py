"""The straight ESC, ESC-FP and ESC-Real networks, module by module in the official operation order (the
reference; `fast.py` is the CPU path), written from `shared/arch/esc.md`.

Public names:
- `ESC` (ESC-light, ESC DIV2K, ESC DFLIP and ESC-XL share it), `ESCFP`, `ESCReal`: plain `nn.Module`s with the
  official state-dict key names, so `params_ema` of the official checkpoints loads with `strict=True`
  (`model.py` puts the fast path in front of them).
- `window_attention(q, k, v, table, window_size, backend)`: the one entry point of the attention back-ends
  ("naive", "sdpa", "flex", "auto").
- `set_attn_backend(model, backend)` (or `model.attn_backend = backend`): switch the back-end of a built model.
- `reference_forward(model, lr)`: the official test procedure (`ESRModel.test`), extended to tiny inputs.

Section numbers (§) in comments refer to the spec.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import LayerNorm2d, mirror_pad, pad_to_multiple

BACKENDS = ("auto", "naive", "sdpa", "flex")

# naive (and CPU sdpa) attention is evaluated in chunks of windows so that the score tensor of one chunk stays
# below this many bytes; windows are independent, so chunking never changes the result
_SCORE_BUDGET_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------------------------------------
# attention back-ends (§3.5, §6)


def relative_position_index(window: int, device: torch.device | None = None) -> torch.Tensor:
    """(W², W²) index into the flattened `[(2W-1)²]` bias table; entry [i, j] for query i and key j.

    Key minus query (§3.5 step 4, the transpose of Swin's convention), built without Python loops. The forward
    pass does not need it (see `relative_position_bias`); it is the plain statement of the rule.
    """
    rc = torch.arange(window, device=device)
    rows = rc.repeat_interleave(window)  # r of token i = r*W + c
    cols = rc.repeat(window)
    d_row = rows[None, :] - rows[:, None] + window - 1
    d_col = cols[None, :] - cols[:, None] + window - 1
    return d_row * (2 * window - 1) + d_col


def relative_position_bias(table: torch.Tensor, window: int) -> torch.Tensor:
    """The dense (heads, W², W²) bias B[h, i, j] = table[h, (r_j-r_i+W-1)(2W-1) + (c_j-c_i+W-1)].

    Same values as `table[:, relative_position_index(window)]`, but built from two sliding-window views of the
    table (no index tensor; one strided copy).
    """
    heads, span = table.shape[0], 2 * window - 1
    # view[h, a, b, i, j] = table2d[h, a + i, b + j]; the query (r_i, c_i) sits at a = W-1-r_i, b = W-1-c_i
    view = table.reshape(heads, span, span).unfold(1, window, 1).unfold(2, window, 1)
    return view.flip(1, 2).reshape(heads, window * window, window * window)


def _flex_score_mod(table: torch.Tensor, window: int) -> Callable:
    span = 2 * window - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        d_row = kv_idx // window - q_idx // window + (window - 1)
        d_col = kv_idx % window - q_idx % window + (window - 1)
        return score + table[h, d_row * span + d_col]

    return score_mod


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable:
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # Each precision and each new window count is a recompile of this one function; a batch of odd sizes in
    # three precisions passes torch's default limit of 8, after which it silently runs the unfused kernel
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.6
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
            break
    # dynamic=None (automatic: static first, dynamic after a shape change). dynamic=True turns the window size
    # captured by the score modifier into a symbol, which the CPU code generator of torch 2.13 fails to compile
    return torch.compile(flex_attention)


def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return importlib.util.find_spec("triton") is not None  # on a GPU, flex_attention compiles to Triton kernels


def _chunks(n_windows: int, per_window_bytes: int) -> int:
    return max(1, min(n_windows, _SCORE_BUDGET_BYTES // max(1, per_window_bytes)))


def _naive(q, k, v, bias):
    # the reference: explicit float32 softmax(q kᵀ/√d + B) v
    out_dtype = q.dtype
    q, k, v, bias = q.float(), k.float(), v.float(), bias.float()
    scale = q.shape[-1] ** -0.5
    step = _chunks(q.shape[0], q.shape[1] * q.shape[2] * k.shape[2] * 4)
    outs = []
    for i in range(0, q.shape[0], step):
        scores = torch.matmul(q[i : i + step] * scale, k[i : i + step].transpose(-2, -1)) + bias
        outs.append(torch.matmul(scores.softmax(dim=-1), v[i : i + step]))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.to(out_dtype)


def _sdpa(q, k, v, bias):
    # a 4-d mask (1, heads, L, L): the shape PyTorch's CPU flash kernel accepts (a 3-d one falls back to math)
    bias = bias.to(q.dtype)[None]
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    step = _chunks(q.shape[0], q.shape[1] * q.shape[2] * k.shape[2] * q.element_size())
    outs = [
        F.scaled_dot_product_attention(q[i : i + step], k[i : i + step], v[i : i + step], attn_mask=bias)
        for i in range(0, q.shape[0], step)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _flex(q, k, v, table, window):
    return _compiled_flex()(q, k, v, score_mod=_flex_score_mod(table.to(q.dtype), window))


_auto_flex_failed = False


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete back-end for `backend` on `device`: "auto" is flex on CUDA (when available), else sdpa."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and _flex_available() and not _auto_flex_failed:
        return "flex"
    return "sdpa"


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    window_size: int,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q kᵀ / √d + B) v per window and head, with B gathered from the relative-position `table`.

    q, k, v: (windows, heads, W², head_dim); table: (heads, (2W-1)²). Back-ends (all the same function):
    "naive" (explicit float32 softmax, the numerical reference), "sdpa" (`scaled_dot_product_attention` with B as
    a float mask; PyTorch picks the kernel), "flex" (compiled `flex_attention`, B added by a score modifier, never
    materialised) and "auto" (flex on CUDA, sdpa elsewhere; falls back to sdpa if flex fails to compile).
    """
    global _auto_flex_failed
    chosen = resolve_backend(backend, q.device)
    if chosen == "flex":
        if backend == "flex":
            return _flex(q, k, v, table, window_size)
        try:
            return _flex(q, k, v, table, window_size)
        except Exception as exc:  # pragma: no cover - depends on the CUDA/triton install
            _auto_flex_failed = True
            warnings.warn(f"flex_attention failed ({exc!r}); using sdpa from now on", RuntimeWarning)
            chosen = "sdpa"
    bias = relative_position_bias(table, window_size)
    if chosen == "naive":
        return _naive(q, k, v, bias)
    return _sdpa(q, k, v, bias)


def set_attn_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every window-attention layer of `model` to `backend` (one of `BACKENDS`); returns the model."""
    resolve_backend(backend, torch.device("cpu"))  # validates the name
    for module in model.modules():
        if isinstance(module, WindowAttention):
            module.attn_backend = backend
    return model


# ----------------------------------------------------------------------------------------------------------------
# building blocks


class ConvFFN(nn.Module):
    """1x1 expand + GELU, depthwise 3x3 + GELU with a residual, 1x1 back (§3.2); no outer residual."""

    def __init__(self, dim: int, kernel_size: int, exp_ratio: float):
        super().__init__()
        hidden = int(dim * exp_ratio)
        self.proj = nn.Conv2d(dim, hidden, 1)
        self.dwc = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.aggr = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        x = F.gelu(self.proj(x))
        x = F.gelu(self.dwc(x)) + x
        return self.aggr(x)


def _kernel_generator(pdim: int, hidden: int, zero_last: bool) -> nn.Sequential:
    """Global average pool -> 1x1 -> GELU -> 1x1 to 9*pdim values: the per-image 3x3 kernels (§3.4 step 2)."""
    last = nn.Conv2d(hidden, pdim * 9, 1)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(pdim, hidden, 1), nn.GELU(), last)


def _per_sample_depthwise(x: torch.Tensor, kernels: torch.Tensor, padding: int) -> torch.Tensor:
    """Depthwise conv of each sample with its own kernels: x (N, P, H, W), kernels (N, P, k, k)."""
    n, p, h, w = x.shape
    weight = kernels.reshape(n * p, 1, *kernels.shape[-2:])
    out = F.conv2d(x.reshape(1, n * p, h, w), weight, padding=padding, groups=n * p)
    return out.reshape(n, p, h, w)


class DynamicLargeKernel(nn.Module):
    """ESC's partial conv (§3.4 step 2-3): shared dense large kernel + per-image dynamic depthwise 3x3."""

    def __init__(self, pdim: int):
        super().__init__()
        self.pdim = pdim
        self.dwc_proj = _kernel_generator(pdim, pdim // 2, zero_last=True)

    def forward(self, x1, large_kernel):
        n = x1.shape[0]
        dynamic = self.dwc_proj(x1).reshape(n, self.pdim, 3, 3)
        out = F.conv2d(x1, large_kernel, padding=large_kernel.shape[-1] // 2)
        return out + _per_sample_depthwise(x1, dynamic, 1)


class FPDynamicLargeKernel(nn.Module):
    """ESC-FP's partial conv (§4): shared 1x1 channel mix, then a depthwise 13x13 = shared + centred dynamic."""

    def __init__(self, pdim: int):
        super().__init__()
        self.pdim = pdim
        self.proj = _kernel_generator(pdim, pdim // 4, zero_last=False)

    def forward(self, x1, kernels):
        lk_channel, lk_spatial = kernels
        n = x1.shape[0]
        dynamic = self.proj(x1).reshape(n, self.pdim, 3, 3)
        size = lk_spatial.shape[-1]
        border = (size - 3) // 2
        spatial = lk_spatial.reshape(1, self.pdim, size, size) + F.pad(dynamic, (border,) * 4)
        return _per_sample_depthwise(F.conv2d(x1, lk_channel), spatial, size // 2)


class ConvAttn(nn.Module):
    """Only the first `pdim` channels go through the large-kernel conv; then a 1x1 over all channels (§3.4)."""

    def __init__(self, dim: int, pdim: int, fp: bool = False):
        super().__init__()
        self.pdim = pdim
        self.plk = FPDynamicLargeKernel(pdim) if fp else DynamicLargeKernel(pdim)
        self.aggr = nn.Conv2d(dim, dim, 1)

    def forward(self, x, kernels):
        x1 = self.plk(x[:, : self.pdim], kernels)
        return self.aggr(torch.cat([x1, x[:, self.pdim :]], dim=1))


class WindowAttention(nn.Module):
    """Non-overlapping W x W window self-attention with a relative-position bias (§3.5).

    `attn_backend` (an attribute, see `window_attention`) picks the back-end; it has no parameters.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, attn_backend: str = "auto"):
        super().__init__()
        resolve_backend(attn_backend, torch.device("cpu"))
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.attn_backend = attn_backend
        self.relative_position_bias = nn.Parameter(torch.empty(num_heads, (2 * window_size - 1) ** 2))
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.to_out = nn.Conv2d(dim, dim, 1)
        if not self.relative_position_bias.is_meta:
            nn.init.normal_(self.relative_position_bias, std=1e-3)

    def forward(self, x):
        n, c, h, w = x.shape
        ws, heads = self.window_size, self.num_heads
        x = pad_to_multiple(x, ws)
        hp, wp = x.shape[-2:]
        nh, nw = hp // ws, wp // ws
        # channels are laid out (qkv, head, d); windows ordered (batch, row-block, col-block), tokens row-major
        qkv = self.to_qkv(x).reshape(n, 3, heads, c // heads, nh, ws, nw, ws)
        qkv = qkv.permute(1, 0, 4, 6, 2, 5, 7, 3).reshape(3, n * nh * nw, heads, ws * ws, c // heads)
        out = window_attention(qkv[0], qkv[1], qkv[2], self.relative_position_bias, ws, self.attn_backend)
        out = out.reshape(n, nh, nw, heads, ws, ws, c // heads).permute(0, 3, 6, 1, 4, 2, 5)
        out = out.reshape(n, c, hp, wp)[:, :, :h, :w]
        return self.to_out(out)


class Block(nn.Module):
    """One ESC block (§3.6): FFN, window attention, `conv_blocks` x (FFN -> ConvAttn), LN + 3x3, outer skip."""

    def __init__(
        self,
        dim: int,
        pdim: int,
        conv_blocks: int,
        window_size: int,
        num_heads: int,
        exp_ratio: float,
        first_exp_ratio: float,
        use_ln: bool,
        fp: bool,
        attn_backend: str,
    ):
        super().__init__()
        self.ln_proj = LayerNorm2d(dim)
        self.proj = ConvFFN(dim, 3, first_exp_ratio)
        self.ln_attn = LayerNorm2d(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, attn_backend)
        self.lns = nn.ModuleList([LayerNorm2d(dim) if use_ln else nn.Identity() for _ in range(conv_blocks)])
        self.pconvs = nn.ModuleList([ConvAttn(dim, pdim, fp) for _ in range(conv_blocks)])
        self.convffns = nn.ModuleList([ConvFFN(dim, 3, exp_ratio) for _ in range(conv_blocks)])
        self.ln_out = LayerNorm2d(dim)
        self.conv_out = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x, kernels):
        skip = x
        x = self.proj(self.ln_proj(x))
        x = x + self.attn(self.ln_attn(x))
        for ln, ffn, pconv in zip(self.lns, self.convffns, self.pconvs):
            x = x + pconv(ffn(ln(x)), kernels)
        return self.conv_out(self.ln_out(x)) + skip


def d4_symmetrize(kernel: torch.Tensor) -> torch.Tensor:
    """Average of the 8 images of `kernel` under the dihedral group D4 acting on its two spatial axes (§3.3)."""
    k = kernel.float()  # small; average in float32 even when the model runs in half precision
    t = k.transpose(-2, -1)
    total = k + k.flip(-1) + k.flip(-2) + k.flip(-2, -1)
    total = total + t + t.flip(-1) + t.flip(-2) + t.flip(-2, -1)
    return (total / 8).to(kernel.dtype)


class _ESCBase(nn.Module):
    """What the three networks share: shallow conv, blocks, back-end switch, window size."""

    first_exp_ratio = 2.0
    fp = False

    def __init__(
        self,
        dim: int,
        pdim: int,
        kernel_size: int,
        n_blocks: int,
        conv_blocks: int,
        window_size: int,
        num_heads: int,
        upscaling_factor: int,
        exp_ratio: float,
        use_ln: bool,
        attn_backend: str,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.pdim, self.kernel_size = dim, pdim, kernel_size
        self.window_size, self.scale = window_size, upscaling_factor
        self.proj = nn.Conv2d(3, dim, 3, padding=1)
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim, pdim, conv_blocks, window_size, num_heads, exp_ratio, self.first_exp_ratio,
                    use_ln, self.fp, attn_backend,
                )
                for _ in range(n_blocks)
            ]
        )
        self.last = nn.Conv2d(dim, dim, 3, padding=1)

    @property
    def attn_backend(self) -> str:
        """The attention back-end of the window-attention layers (settable; see `window_attention`)."""
        return self.blocks[0].attn.attn_backend

    @attn_backend.setter
    def attn_backend(self, backend: str) -> None:
        set_attn_backend(self, backend)

    def forward(self, x):
        f, f0 = self._features(x, self.large_kernel())
        return self.tail(f, f0, x)

    def large_kernel(self):
        """The large kernel every ConvAttn of the network shares (§3.3): the D4-symmetrised `plk_filter` (ESC,
        ESC-Real; ESC-FP has its own)."""
        return d4_symmetrize(self.plk_filter)

    def tail(self, f, f0, x):
        """From the blocks' output `f`, the shallow features `f0` and the input `x` to the image."""
        raise NotImplementedError

    def _features(self, x, kernels):
        f0 = self.proj(x)
        f = f0
        for block in self.blocks:
            f = block(f, kernels)
        return f, f0


def _init_large_kernel(param: nn.Parameter) -> None:
    if not param.is_meta:
        nn.init.orthogonal_(param)


class ESC(_ESCBase):
    """ESC (§3): used by ESC-light, ESC (DIV2K / DFLIP) and ESC-XL.

    The shared `plk_filter` is stored as loaded and D4-symmetrised at every forward pass (§3.3), so
    `state_dict()` round-trips the checkpoint and an un-symmetrised checkpoint still computes correctly.
    """

    def __init__(
        self,
        dim: int = 64,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 5,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 4,
        upscaling_factor: int = 4,
        exp_ratio: float = 1.25,
        use_ln: bool = False,
        attn_backend: str = "auto",
    ):
        super().__init__(
            dim, pdim, kernel_size, n_blocks, conv_blocks, window_size, num_heads, upscaling_factor,
            exp_ratio, use_ln, attn_backend,
        )
        self.plk_filter = nn.Parameter(torch.empty(pdim, pdim, kernel_size, kernel_size))
        _init_large_kernel(self.plk_filter)
        self.to_img = nn.Conv2d(dim, 3 * upscaling_factor**2, 3, padding=1)

    def tail(self, f, f0, x):
        """From the blocks' output `f`, the shallow features `f0` and the input `x` to the image."""
        f = self.last(f) + f0
        s = self.scale
        # global residual: each colour channel repeated s² times = nearest-neighbour upsampling after the shuffle
        return F.pixel_shuffle(self.to_img(f) + x.repeat_interleave(s * s, dim=1), s)


class ESCFP(_ESCBase):
    """ESC-FP (§4): decomposed, non-symmetrised large kernel, LayerNorm before `last`, bicubic residual."""

    first_exp_ratio = 1.5
    fp = True

    def __init__(
        self,
        dim: int = 48,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 5,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 3,
        upscaling_factor: int = 4,
        exp_ratio: float = 1.25,
        attn_backend: str = "auto",
    ):
        if kernel_size != 13:
            raise ValueError("ESC-FP hard-codes a 13x13 large kernel")
        super().__init__(
            dim, pdim, kernel_size, n_blocks, conv_blocks, window_size, num_heads, upscaling_factor,
            exp_ratio, True, attn_backend,
        )
        self.lk_channel = nn.Parameter(torch.empty(pdim, pdim, 1, 1))
        self.lk_spatial = nn.Parameter(torch.empty(pdim, 1, kernel_size, kernel_size))
        _init_large_kernel(self.lk_channel)
        if not self.lk_spatial.is_meta:
            nn.init.kaiming_uniform_(self.lk_spatial, a=math.sqrt(5))
        self.ln_last = LayerNorm2d(dim)
        self.to_img = nn.Conv2d(dim, 3 * upscaling_factor**2, 3, padding=1)

    def large_kernel(self):
        """The shared parts of ESC-FP's large kernel: the channel mix and the depthwise 13x13 (§4)."""
        return self.lk_channel, self.lk_spatial

    def tail(self, f, f0, x):
        """From the blocks' output `f`, the shallow features `f0` and the input `x` to the image."""
        f = self.last(self.ln_last(f)) + f0
        s = self.scale
        up = F.interpolate(x, scale_factor=s, mode="bicubic", align_corners=False)
        return F.pixel_shuffle(self.to_img(f), s) + up


class _MirrorConv2d(nn.Conv2d):
    """A conv with reflect padding that also accepts inputs smaller than the pad (see `mirror_pad`)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, groups: int = 1):
        super().__init__(cin, cout, kernel_size, padding=0, groups=groups)
        self.mirror = kernel_size // 2

    def forward(self, x):
        return super().forward(mirror_pad(x, *(self.mirror,) * 4))


class ESCReal(_ESCBase):
    """ESC-Real (§5): ESC with LayerNorms everywhere, an image skip branch and a fixed x4 nearest+conv upsampler."""

    def __init__(
        self,
        dim: int = 64,
        pdim: int = 16,
        kernel_size: int = 13,
        n_blocks: int = 10,
        conv_blocks: int = 5,
        window_size: int = 32,
        num_heads: int = 4,
        upscaling_factor: int = 4,
        exp_ratio: float = 2.0,
        attn_backend: str = "auto",
    ):
        if upscaling_factor != 4:
            raise ValueError("ESC-Real's upsampler is fixed at x4")
        super().__init__(
            dim, pdim, kernel_size, n_blocks, conv_blocks, window_size, num_heads, upscaling_factor,
            exp_ratio, True, attn_backend,
        )
        self.plk_filter = nn.Parameter(torch.empty(pdim, pdim, kernel_size, kernel_size))
        _init_large_kernel(self.plk_filter)
        self.skip = nn.Sequential(
            nn.Conv2d(3, dim * 2, 1),
            _MirrorConv2d(dim * 2, dim * 2, 7, groups=dim * 2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(dim * 2, dim, 1),
        )
        self.to_img = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(dim, 3, 3, padding=1),
        )

    def tail(self, f, f0, x):
        """From the blocks' output `f`, the shallow features `f0` and the input `x` to the image."""
        f = self.last(f) + f0 + self.skip(x)
        return self.to_img(f)


# ----------------------------------------------------------------------------------------------------------------
# the family object


def reference_forward(model: nn.Module, lr: torch.Tensor) -> torch.Tensor:
    """The official test procedure (`ESRModel.test`, §7), without gradients.

    Reflect-pad the batch on the right/bottom to multiples of the model's window size (32; 48 for ESC-XL), run
    the network on it whole, crop to `scale` x the input size. Unclamped.

    Tiny inputs: the official code fails when a side is too small for PyTorch's reflect padding (pad >= side,
    i.e. a side <= 16 for window 32, <= 24 for window 48). There the mirror is repeated instead: the padded
    axis is the periodic continuation of the mirrored image (period 2(side-1)), which equals applying reflect
    padding again and again until the side is long enough, and which equals the official padding wherever
    that one works. A side of 1 pixel is replicated.
    """
    h, w = lr.shape[-2:]
    s = model.scale
    with torch.no_grad():
        out = model(pad_to_multiple(lr, model.window_size))
    return out[..., : h * s, : w * s]
