"""ESC family (`upscale.models.esc`): golden fixtures, back-ends, batches, tiny inputs, build speed, detection."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_matches_golden,
    assert_same_bits_at_any_thread_count,
    detected,
    golden_case_names,
    load_golden,
)

from upscale import registry
from upscale.models import esc, kernels
from upscale.models.esc import ARCHITECTURE, fast

VARIANTS = ("esc-light", "esc", "esc-dflip", "esc-fp", "esc-xl", "esc-real")

# §1 of shared/arch/esc.md: (params, state-dict tensors) per variant and scale
SPEC_PARAMS = {
    ("esc-light", 2): 603_600, ("esc-light", 3): 612_255, ("esc-light", 4): 624_372,
    ("esc", 2): 946_728, ("esc", 3): 955_383, ("esc", 4): 967_500,
    ("esc-dflip", 2): 946_728, ("esc-dflip", 3): 955_383, ("esc-dflip", 4): 967_500,
    ("esc-xl", 2): 12_455_916, ("esc-xl", 3): 12_481_851, ("esc-xl", 4): 12_518_160,
    ("esc-fp", 2): 523_675, ("esc-fp", 3): 530_170, ("esc-fp", 4): 539_263,
    ("esc-real", 4): 2_265_307,
}
SPEC_TENSORS = {"esc-light": 244, "esc": 402, "esc-dflip": 402, "esc-xl": 719, "esc-fp": 455, "esc-real": 909}

ENTRIES = [e for e in registry.all_entries() if e.family == "esc"]

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # ESC's CPU path runs on them


def build(variant: str, scale: int, **overrides) -> torch.nn.Module:
    return ARCHITECTURE.build(variant, scale, {**registry.resolve(variant, scale).hparams, **overrides})


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights where nothing is trivial (the official init zeroes the dynamic-kernel generator)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("relative_position_bias"):
                p.add_(0.3 * noise)
            elif p.numel() > 1 and p.std() > 0:
                p.add_(0.05 * p.std() * noise)
            else:
                p.add_(0.1 * noise)
    return model


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random images in [0, 1] (different per sample)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, h // 4 + 2, w // 4 + 2, generator=gen)
    img = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (0.8 * img + 0.2 * torch.rand(n, 3, h, w, generator=gen)).clamp(0, 1)


def registry_entry_for_case(meta: dict) -> registry.ModelEntry:
    """The registry entry whose hparams are the case's official constructor arguments.

    case.json names the class (`class` / hparams `type`) and gives the YAML `network_g` block; our registry
    gives `arch` plus the same keys (`use_ln` only for ESC). ESC DIV2K and DFLIP share hparams: the first
    entry ("esc") wins, which is right for the DIV2K fixtures.
    """
    hp = meta["hparams"]
    arch = meta.get("class") or hp["type"]
    for entry in ENTRIES:
        want = dict(entry.hparams)
        if entry.scale != meta["scale"] or want.pop("arch") != arch:
            continue
        if all(hp.get(k, False if k == "use_ln" else None) == v for k, v in want.items()):
            return entry
    pytest.fail(f"no registry entry matches case {meta['case']} ({arch}, x{meta['scale']}, {hp})")


# ---------------------------------------------------------------------------------------------------------------
# golden fixtures (every case folder; new ones are picked up automatically)


def _golden_params():
    names = golden_case_names("esc")
    return names or [pytest.param(None, marks=pytest.mark.skip(reason="../shared/golden/esc is missing"))]


@pytest.mark.parametrize("case_name", _golden_params())
def test_golden(case_name):
    case = load_golden("esc", case_name)
    entry = registry_entry_for_case(case.meta)
    model = ARCHITECTURE.build(entry.name, entry.scale, entry.hparams)
    model.load_state_dict(case.weights, strict=True)
    io = case.io
    tol = case.tolerance
    with torch.no_grad():
        if "sr_raw" in io:
            assert_matches_golden(model(io["lr"]), io["sr_raw"], tol, f"{case_name} sr_raw")
        if "sr_protocol" in io:
            ours = ARCHITECTURE.reference_forward(model, io["lr_protocol"])
            assert_matches_golden(ours, io["sr_protocol"], tol, f"{case_name} sr_protocol")
        if "sr_raw_protocol_input" in io:
            ours = model(io["lr_protocol"])
            assert_matches_golden(ours, io["sr_raw_protocol_input"], tol, f"{case_name} sr_raw_protocol_input")


@pytest.mark.parametrize("case_name", _golden_params())
def test_detect_golden_weights(case_name):
    case = load_golden("esc", case_name)
    entry = registry_entry_for_case(case.meta)
    assert detected(case.weights) == (entry.name, entry.scale)


def test_state_dict_round_trip_and_baked_symmetry():
    """Loading keeps the stored (un-symmetrised) kernel; symmetrising it beforehand changes nothing (§3.3)."""
    model = perturbed(build("esc-light", 2), seed=1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = build("esc-light", 2)
    fresh.load_state_dict(sd, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
    assert not torch.allclose(esc.d4_symmetrize(sd["plk_filter"]), sd["plk_filter"])  # really not symmetric
    x = images(1, 20, 24)
    with torch.no_grad():
        out = fresh(x)
        baked = dict(sd, plk_filter=esc.d4_symmetrize(sd["plk_filter"]))
        fresh.load_state_dict(baked, strict=True)
        assert (fresh(x) - out).abs().max() <= 1e-5


def test_d4_symmetrize_is_the_group_average():
    k = torch.randn(4, 3, 13, 13)
    s = esc.d4_symmetrize(k)
    t = s.transpose(-2, -1)
    for image in (s.flip(-1), s.flip(-2), s.flip(-2, -1), t, t.flip(-1), t.flip(-2), t.flip(-2, -1)):
        assert torch.allclose(image, s, atol=1e-6)
    assert torch.allclose(esc.d4_symmetrize(s), s, atol=1e-6)
    assert torch.allclose(s.sum(), k.sum(), atol=1e-3)  # an average: the total is kept


# ---------------------------------------------------------------------------------------------------------------
# relative-position bias and attention back-ends


def test_relative_position_bias_is_key_minus_query():
    window, heads = 3, 2
    table = torch.randn(heads, (2 * window - 1) ** 2)
    bias = esc.relative_position_bias(table, window)
    for i in range(window * window):
        for j in range(window * window):
            (ri, ci), (rj, cj) = divmod(i, window), divmod(j, window)
            idx = (rj - ri + window - 1) * (2 * window - 1) + (cj - ci + window - 1)
            assert torch.equal(bias[:, i, j], table[:, idx])
    for window in (1, 2, 5, 32):
        table = torch.randn(heads, (2 * window - 1) ** 2)
        index = esc.relative_position_index(window)
        assert torch.equal(esc.relative_position_bias(table, window), table[:, index])


def test_window_attention_naive_vs_sdpa():
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 5, 4, 64, 16, generator=gen).unbind(0)
    table = torch.randn(4, 15 * 15, generator=gen)
    naive = esc.window_attention(q, k, v, table, 8, "naive")
    sdpa = esc.window_attention(q, k, v, table, 8, "sdpa")
    assert (naive - sdpa).abs().max() <= 1e-5
    assert esc.resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError):
        esc.window_attention(q, k, v, table, 8, "bogus")


def test_backend_override_api_and_model_agreement():
    model = perturbed(build("esc-light", 2, attn_backend="naive"), seed=2)
    layers = [m for m in model.modules() if isinstance(m, esc.WindowAttention)]
    assert model.attn_backend == "naive" and all(m.attn_backend == "naive" for m in layers)
    x = images(1, 40, 36)
    with torch.no_grad():
        naive = model(x)
        model.attn_backend = "sdpa"
        assert all(m.attn_backend == "sdpa" for m in layers)
        sdpa = model(x)
        esc.set_attn_backend(model, "auto")
        auto = model(x)
    assert model.attn_backend == "auto"
    assert (naive - sdpa).abs().max() <= 1e-5 and (naive - auto).abs().max() <= 1e-5
    with pytest.raises(ValueError):
        model.attn_backend = "fast"
    with pytest.raises(ValueError):
        build("esc-light", 2, attn_backend="fast")


@pytest.mark.skipif(
    os.environ.get("UPSCALE_TEST_FLEX_CPU") != "1",
    reason="flex_attention on CPU needs an inductor C++ compile (about 5-20 s on 2 cores); "
    "set UPSCALE_TEST_FLEX_CPU=1 to run it",
)
def test_flex_matches_naive_on_cpu():
    model = perturbed(build("esc-light", 2, attn_backend="naive"), seed=4)
    x = images(1, 32, 32)
    with torch.no_grad():
        naive = model(x)
        model.attn_backend = "flex"
        flex = model(x)
    assert (naive - flex).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backends_and_half_precision():
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = perturbed(build("esc-light", 2), seed=5).cuda()
        x = images(2, 64, 48).cuda()
        assert esc.resolve_backend("auto", x.device) == "flex"
        outs = {}
        with torch.no_grad():
            for backend in ("naive", "sdpa", "flex", "auto"):
                model.attn_backend = backend
                outs[backend] = model(x)
            for backend in ("sdpa", "flex", "auto"):
                assert (outs[backend] - outs["naive"]).abs().max() <= 1e-4, backend
            gen = torch.Generator().manual_seed(6)
            q, k, v = torch.randn(3, 3, 4, 64, 16, generator=gen).cuda().unbind(0)
            table = torch.randn(4, 225, generator=gen).cuda()
            ref = esc.window_attention(q, k, v, table, 8, "naive")
            for backend in ("sdpa", "flex"):
                assert (esc.window_attention(q, k, v, table, 8, backend) - ref).abs().max() <= 1e-5, backend
            # the output itself is rounded to the dtype: outputs reach ~1.4, where a bf16 step is 2**-7 = 7.8e-3
            # (an H200 measured 0.020 for bf16 with sdpa), an fp16 step 2**-10
            for dtype, bound in ((torch.float16, 1e-2), (torch.bfloat16, 4e-2)):
                for backend in ("sdpa", "flex"):
                    model.float().attn_backend = backend
                    half = model.to(dtype)(x.to(dtype)).float()
                    assert half.isfinite().all()
                    assert (half - outs["naive"]).abs().max() <= bound, (dtype, backend)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


# ---------------------------------------------------------------------------------------------------------------
# batches, tiny inputs, padding


@pytest.mark.parametrize("variant", ["esc-light", "esc-fp"])
def test_batch_equals_single_images(variant):
    model = perturbed(build(variant, 3), seed=7)
    x = images(3, 36, 44, seed=8)  # not a multiple of the window: the attention padding is exercised too
    with torch.no_grad():
        batch = model(x)
        for i in range(3):
            assert (batch[i : i + 1] - model(x[i : i + 1])).abs().max() <= 1e-5
        protocol = ARCHITECTURE.reference_forward(model, x)
        assert (protocol[1:2] - ARCHITECTURE.reference_forward(model, x[1:2])).abs().max() <= 1e-5


def test_mirror_pad_matches_reflect_and_repeats_it():
    x = torch.arange(2 * 7 * 9, dtype=torch.float32).view(1, 2, 7, 9)
    assert torch.equal(esc.mirror_pad(x, 1, 8, 2, 6), F.pad(x, (1, 8, 2, 6), mode="reflect"))
    # beyond the side: the same as reflect-padding again and again
    step = x
    for _ in range(5):
        h, w = step.shape[-2:]
        step = F.pad(step, (0, min(w - 1, max(0, 32 - w)), 0, min(h - 1, max(0, 32 - h))), mode="reflect")
    assert torch.equal(esc.mirror_pad(x, 0, 23, 0, 25), step[..., :32, :32])
    assert torch.equal(esc.mirror_pad(torch.ones(1, 1, 1, 1), 3, 3, 3, 3), torch.ones(1, 1, 7, 7))


TINY = [("esc-light", 2), ("esc-light", 3), ("esc-light", 4), ("esc-fp", 3), ("esc-real", 4)]


@pytest.mark.parametrize("variant,scale", TINY)
def test_tiny_input(variant, scale):
    """7x9 is too small for the official reflect padding (quirk 12): we mirror repeatedly instead."""
    model = perturbed(build(variant, scale), seed=9)
    x = images(1, 7, 9)
    with torch.no_grad():
        for out in (ARCHITECTURE.reference_forward(model, x), model(x)):
            assert out.shape == (1, 3, 7 * scale, 9 * scale)
            assert out.isfinite().all()
        one = model(images(1, 1, 2))
    assert one.shape == (1, 3, scale, 2 * scale) and one.isfinite().all()


def test_reference_forward_is_pad_run_crop():
    model = perturbed(build("esc-light", 2), seed=10)
    x = images(1, 21, 27)
    with torch.no_grad():
        ours = ARCHITECTURE.reference_forward(model, x)
        padded = F.pad(x, (0, 5, 0, 11), mode="reflect")
        assert torch.equal(ours, model(padded)[..., :42, :54])


# ---------------------------------------------------------------------------------------------------------------
# building, parameter counts, detection


def test_architecture_object():
    assert ARCHITECTURE.family == "esc"
    assert set(ARCHITECTURE.variants) == set(VARIANTS) == {e.name for e in ENTRIES}
    with pytest.raises(ValueError):
        ARCHITECTURE.build("esc-real", 2, registry.resolve("esc-real", 4).hparams)
    with pytest.raises(ValueError):
        ARCHITECTURE.build("esc-huge", 2, {})


def test_build_xl_is_fast_and_bufferless():
    hparams = registry.resolve("esc-xl", 2).hparams
    start = time.perf_counter()
    model = ARCHITECTURE.build("esc-xl", 2, hparams)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"building ESC-XL x2 took {elapsed:.2f} s"
    assert not list(model.buffers())  # no index tables or other hidden state
    assert not model.training


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.label)
def test_param_counts(entry):
    model = ARCHITECTURE.build(entry.name, entry.scale, entry.hparams)
    sd = model.state_dict()
    count = sum(v.numel() for v in sd.values())
    assert count == sum(p.numel() for p in model.parameters())
    assert count == entry.params == SPEC_PARAMS[(entry.name, entry.scale)]
    assert len(sd) == SPEC_TENSORS[entry.name]
    expected = "esc" if entry.name == "esc-dflip" else entry.name  # DIV2K and DFLIP weights look alike
    assert detected(sd) == (expected, entry.scale)


def test_detect_rejects_other_state_dicts():
    assert detected({"conv.weight": torch.zeros(3, 3, 3, 3)}) is None
    with torch.device("meta"):
        sd = build("esc", 2).state_dict()
    missing = dict(sd)
    missing.pop("blocks.0.pconvs.1.aggr.bias")
    assert detected(missing) is None
    odd = dict(sd, **{"to_img.weight": torch.empty(15, 64, 3, 3), "to_img.bias": torch.empty(15)})
    assert detected(odd) is None


# ---------------------------------------------------------------------------------------------------------------
# the CPU path on the fused kernels (fast.py) against the straight modules


def _straight(model):
    return ARCHITECTURE.straight_twin(model)


needs_kernels = pytest.mark.skipif(kernels.load() is None, reason=f"fused CPU kernels unavailable: {kernels.status()}")


@needs_kernels
@pytest.mark.parametrize("variant,scale,n,h,w", [
    ("esc-light", 4, 1, 64, 64), ("esc-light", 2, 2, 37, 70), ("esc", 3, 1, 33, 31), ("esc-fp", 4, 1, 45, 32),
    ("esc-fp", 2, 2, 16, 9), ("esc-real", 4, 1, 20, 36), ("esc-xl", 2, 1, 50, 13), ("esc-light", 4, 1, 1, 5),
])
def test_fast_path_matches_the_straight_modules(variant, scale, n, h, w, monkeypatch):
    # sizes below, at and across the window (padding inside the attention), batches, every network class
    model = perturbed(build(variant, scale), seed=h + w)
    x = images(n, h, w, seed=n * h)
    calls = []
    real = fast.fast_forward
    monkeypatch.setattr(fast, "fast_forward", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = model(x)
        want = _straight(model)(x)
    assert calls == [1], "the fast path did not run"
    diff = (got - want).abs()
    assert diff.max() <= 5e-5 and diff.mean() <= 1e-6, f"max {diff.max():.3g}, mean {diff.mean():.3g}"


@needs_kernels
def test_fast_path_gives_the_same_bits_at_any_thread_count():
    model = perturbed(build("esc-light", 2), seed=3)
    x = images(1, 70, 45, seed=4)
    assert_same_bits_at_any_thread_count(lambda: model(x))


def test_straight_modules_run_where_the_fast_path_does_not_apply(monkeypatch):
    model = perturbed(build("esc-light", 2), seed=5)
    x = images(1, 24, 24)
    monkeypatch.setattr(fast, "fast_forward", lambda *a: pytest.fail("fast path taken"))
    with torch.no_grad():
        _straight(model)(x)  # fast = False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    model(x)  # autograd records: the straight modules
    monkeypatch.setenv("UPSCALE_CPU_KERNELS", "0")
    monkeypatch.setattr(kernels, "_state", {})
    with torch.no_grad():
        model(x)  # no kernels
    assert model.fast_path and not _straight(model).fast_path
