"""ASID / ASID-d8: shapes and parameter counts, golden outputs (raw and official tiled protocol), the official
tiling grid in `upscale.tiling`, small and odd inputs, batch independence and checkpoint detection."""

from __future__ import annotations

import functools

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
from upscale.models import get_architecture, kernels
from upscale.models.asid import (
    ARCHITECTURE,
    ASID,
    ASIDArchitecture,
    fast,
)
from upscale.tiling import grid_origins, plan_tiles, tiled_forward

CASES = golden_case_names("asid")
pytestmark = pytest.mark.usefixtures("cpu_kernels")  # ASID's CPU path runs on them
OFFICIAL_CLASS_TO_VARIANT = {"ASID": "asid", "ASIDd8": "asid-d8"}

PARAMS = {
    ("asid", 2): 297_516,
    ("asid", 3): 304_011,
    ("asid", 4): 313_104,
    ("asid-d8", 2): 732_146,
    ("asid-d8", 3): 738_641,
    ("asid-d8", 4): 747_734,
}
STATE_DICT_ENTRIES = {"asid": 366, "asid-d8": 956}


@functools.cache
def random_model(variant: str, scale: int) -> ASID:
    torch.manual_seed(1234 + scale)
    return ARCHITECTURE.build(variant, scale, registry.resolve(variant, scale).hparams)


@functools.cache
def golden_model(name: str) -> ASID:
    case = load_golden("asid", name)
    variant = OFFICIAL_CLASS_TO_VARIANT[case.meta["variant"]]
    model = ARCHITECTURE.build(variant, case.meta["scale"], registry.resolve(variant, case.meta["scale"]).hparams)
    model.load_state_dict(case.weights, strict=True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# construction


def test_architecture_object():
    assert get_architecture("asid") is ARCHITECTURE
    assert isinstance(ARCHITECTURE, ASIDArchitecture)
    assert ARCHITECTURE.family == "asid"
    assert ARCHITECTURE.variants == ("asid", "asid-d8")


@pytest.mark.parametrize(("variant", "scale"), sorted(PARAMS))
def test_parameter_count_matches_registry(variant, scale):
    entry = registry.resolve(variant, scale)
    assert entry.family == "asid"
    model = ARCHITECTURE.build(variant, scale, entry.hparams)
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS[variant, scale] == entry.params
    assert len(model.state_dict()) == STATE_DICT_ENTRIES[variant]
    assert not model.training
    assert model.scale == scale


def test_build_rejects_inconsistent_hparams():
    with pytest.raises(ValueError):
        ARCHITECTURE.build("asid", 4, {})  # the zoo says how many groups
    with pytest.raises(ValueError):
        ARCHITECTURE.build("asid-xl", 4, {"groups": 3})
    with pytest.raises(ValueError):
        ARCHITECTURE.build("asid", 4, {"groups": 3, "window_size": 16})


# ---------------------------------------------------------------------------------------------------------------
# golden outputs


@pytest.mark.parametrize("name", CASES)
def test_golden_raw(name):
    """sr_raw is the official forward on lr_raw_input, both in [-1, 1]: compare through forward_raw."""
    case = load_golden("asid", name)
    io = case.io
    model = golden_model(name)
    # the golden raw input is exactly what our [0, 1] -> [-1, 1] mapping produces
    assert torch.equal((io["lr"] - 0.5) / 0.5, io["lr_raw_input"])
    with torch.no_grad():
        raw = model.forward_raw(io["lr_raw_input"])
        unit = model(io["lr"])
    assert_matches_golden(raw, io["sr_raw"], case.tolerance, f"{name} sr_raw")
    # the [0, 1] contract path is the same network: (sr_raw + 1) / 2, unclamped
    assert_matches_golden(unit, (io["sr_raw"] + 1) / 2, case.tolerance, f"{name} forward on [0,1]")


@pytest.mark.parametrize("name", CASES)
def test_golden_protocol(name):
    """sr_protocol is the official tiled procedure's output in [0, 1] AFTER the official clip to [0, 1];
    reference_forward returns it unclamped, so clamp before comparing."""
    case = load_golden("asid", name)
    io = case.io
    proto = case.meta["protocol"]
    h, w = io["lr_protocol"].shape[-2:]
    tile = min(64, h, w)
    assert proto["tile"] == tile and proto["overlap"] == 24
    assert grid_origins(h, tile, 24) == proto["row_starts"]
    assert grid_origins(w, tile, 24) == proto["col_starts"]
    ours = ARCHITECTURE.reference_forward(golden_model(name), io["lr_protocol"])
    assert_matches_golden(ours.clamp(0, 1), io["sr_protocol"], case.tolerance, f"{name} sr_protocol")


@pytest.mark.parametrize("name", CASES)
def test_detect_golden_weights(name):
    case = load_golden("asid", name)
    variant = OFFICIAL_CLASS_TO_VARIANT[case.meta["variant"]]
    assert detected(case.weights) == (variant, case.meta["scale"])


def test_detect_rejects_other_state_dicts():
    sd = random_model("asid", 2).state_dict()
    assert detected(sd) == ("asid", 2)
    assert detected({}) is None
    assert detected({"conv_first.weight": torch.zeros(64, 3, 3, 3)}) is None
    two_groups = {k: v for k, v in sd.items() if not k.startswith("block2.")}
    assert detected(two_groups) is None
    odd_scale = dict(sd, **{"up.0.weight": torch.zeros(3 * 25, 48, 3, 3)})
    assert detected(odd_scale) is None


# ---------------------------------------------------------------------------------------------------------------
# the official tiling grid (upscale.tiling)


def test_grid_origins_official_examples():
    assert grid_origins(83, 64, 24) == [0, 19]
    assert grid_origins(101, 64, 24) == [0, 37]
    assert grid_origins(170, 64, 24) == [0, 40, 80, 106]
    assert grid_origins(104, 64, 24) == [0, 40]  # a step landing on the end is not repeated
    assert grid_origins(64, 64, 24) == [0]
    assert grid_origins(76, 57, 24) == [0, 19]
    assert grid_origins(30, 25, 24) == [0, 1, 2, 3, 4, 5]
    assert plan_tiles(83, 101, 64, 24) == [(0, 0), (0, 37), (19, 0), (19, 37)]
    with pytest.raises(ValueError):
        grid_origins(30, 24, 24)  # no stride
    with pytest.raises(ValueError):
        grid_origins(20, 24, 8)  # tile longer than the axis


def _official_loop(fn, x, scale, tile, overlap):
    """The loop of the official tester written out naively (full-size E and W tensors)."""
    h, w = x.shape[-2:]
    stride = tile - overlap
    rows = list(range(0, h - tile, stride)) + [h - tile]
    cols = list(range(0, w - tile, stride)) + [w - tile]
    e = torch.zeros(x.shape[0], 3, h * scale, w * scale)
    wt = torch.zeros_like(e)
    for r in rows:
        for c in cols:
            y = fn(x[..., r : r + tile, c : c + tile])
            e[..., r * scale : (r + tile) * scale, c * scale : (c + tile) * scale] += y
            wt[..., r * scale : (r + tile) * scale, c * scale : (c + tile) * scale] += 1
    return e / wt


def test_tiled_forward_matches_official_loop_bitwise():
    # a tile-dependent function, so that wrong placement or weighting shows
    def fn(t):
        return F.interpolate(t - t.mean(dim=(2, 3), keepdim=True) * 0.3, scale_factor=3, mode="nearest") + t.std()

    x = torch.rand(2, 3, 83, 170)
    ours = tiled_forward(fn, x, 3, 64, 24)
    assert torch.equal(ours, _official_loop(fn, x, 3, 64, 24))


def test_tiled_forward_pointwise_fn_is_seamless():
    x = torch.rand(1, 3, 50, 90)
    up = functools.partial(F.interpolate, scale_factor=2, mode="nearest")
    torch.testing.assert_close(tiled_forward(up, x, 2, (32, 40), (8, 16)), up(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        tiled_forward(up, x, 3, 32, 8)  # fn output does not match the scale


# ---------------------------------------------------------------------------------------------------------------
# small / odd inputs, single tiles, batches


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_small_and_odd_sizes(scale):
    model = random_model("asid", scale)
    torch.manual_seed(0)
    for h, w in [(8, 8), (13, 17), (64, 65), (200, 9)]:
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            y = model(x)
        p = ARCHITECTURE.reference_forward(model, x)
        for out, what in ((y, "model(x)"), (p, "reference_forward")):
            assert out.shape == (1, 3, h * scale, w * scale), (what, h, w)
            assert torch.isfinite(out).all(), (what, h, w)
        if max(h, w) <= 24:  # a single tile: the protocol is the plain forward
            torch.testing.assert_close(p, y, rtol=0, atol=1e-6)


def test_raw_network_rejects_sides_of_8_or_less():
    model = random_model("asid", 2)
    with pytest.raises(ValueError):
        model.forward_raw(torch.zeros(1, 3, 8, 40))
    with torch.no_grad():
        assert model.forward_raw(torch.zeros(1, 3, 9, 40)).shape == (1, 3, 18, 80)


@pytest.mark.parametrize("size", [(64, 64), (40, 40)])
def test_single_tile_protocol_equals_forward(size):
    model = random_model("asid", 4)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(7))
    assert plan_tiles(*size, min(64, *size), 24) == [(0, 0)]
    with torch.no_grad():
        y = model(x)
    p = ARCHITECTURE.reference_forward(model, x)
    torch.testing.assert_close(p, y, rtol=0, atol=1e-6)


def test_batch_matches_single_images():
    model = random_model("asid", 3)
    x = torch.rand(3, 3, 20, 29, generator=torch.Generator().manual_seed(3))  # odd sizes: padding inside
    with torch.no_grad():
        batched = model(x)
        singles = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])  # really different images


# ---------------------------------------------------------------------------------------------------------------
# the CPU path on the fused kernels (asid/fast.py) against the straight modules

needs_kernels = pytest.mark.skipif(kernels.load() is None, reason=f"fused CPU kernels unavailable: {kernels.status()}")


def _perturbed(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


@needs_kernels
@pytest.mark.parametrize("variant,scale,n,h,w", [
    ("asid", 4, 3, 64, 64), ("asid", 2, 1, 37, 50), ("asid-d8", 3, 2, 16, 24), ("asid", 3, 1, 9, 9),
    ("asid-d8", 4, 1, 64, 40), ("asid", 2, 2, 25, 72),
])
def test_fast_path_matches_the_straight_modules(variant, scale, n, h, w, monkeypatch):
    # tiles of the official size, odd sizes (zero padding to the 8 px windows), the smallest raw size, batches
    model = _perturbed(ARCHITECTURE.build(variant, scale, registry.resolve(variant, scale).hparams), h * w)
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(n + h)) * 2 - 1
    calls = []
    real = fast.forward_raw
    monkeypatch.setattr(fast, "forward_raw", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = model.forward_raw(x)
        want = ARCHITECTURE.straight_twin(model).forward_raw(x)
    assert calls == [1], "the fast path did not run"
    diff = (got - want).abs()
    assert diff.max() <= 2e-5 and diff.mean() <= 5e-7, f"max {diff.max():.3g}, mean {diff.mean():.3g}"


@needs_kernels
def test_fast_path_gives_the_same_bits_at_any_thread_count():
    model = _perturbed(ARCHITECTURE.build("asid", 2, registry.resolve("asid", 2).hparams), 1)
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(2))
    assert_same_bits_at_any_thread_count(lambda: model(x))


def test_straight_modules_run_where_the_fast_path_does_not_apply(monkeypatch):
    model = ARCHITECTURE.build("asid", 2, registry.resolve("asid", 2).hparams)
    x = torch.rand(1, 3, 24, 24)
    monkeypatch.setattr(fast, "forward_raw", lambda *a: pytest.fail("fast path taken"))
    with torch.no_grad():
        ARCHITECTURE.straight_twin(model)(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    model(x)  # autograd records
    monkeypatch.setenv("UPSCALE_CPU_KERNELS", "0")
    monkeypatch.setattr(kernels, "_state", {})
    with torch.no_grad():
        model(x)


@needs_kernels
def test_scratch_maps_are_reused_between_forwards_and_dropped_after_a_run(monkeypatch):
    """Reused from one forward to the next; kept after a run while small, dropped when large
    (`base.KEEP_SCRATCH_BYTES`)."""
    from upscale.engine import Upscaler
    from upscale.models import base

    entry = registry.resolve("asid", 2)
    model = ARCHITECTURE.build("asid", 2, entry.hparams)
    x = torch.rand(2, 3, 24, 32) * 2 - 1
    with torch.no_grad():
        model.forward_raw(x)
        first = {key: [t.data_ptr() for t in ts] for key, ts in model._scratch.buffers.items()}
        model.forward_raw(x)
        again = {key: [t.data_ptr() for t in ts] for key, ts in model._scratch.buffers.items()}
    assert first == again  # the same buffers, none added
    up = Upscaler(entry, model, torch.device("cpu"), "auto", "fp32")
    up.run(torch.rand(1, 3, 40, 40))
    assert model._scratch is not None and 0 < model._scratch.nbytes() < base.KEEP_SCRATCH_BYTES
    monkeypatch.setattr(base, "KEEP_SCRATCH_BYTES", 0)
    up.run(torch.rand(1, 3, 40, 40))
    assert model._scratch is None
