"""AGDN / AGDN-S against the official outputs (golden fixtures) and the spec's parameter counts; the fast
inference path against the straight reference implementation."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    REPO,
    assert_matches_golden,
    detected,
    golden_case_names,
    load_golden,
)
from PIL import Image

from upscale import registry
from upscale.engine import Upscaler
from upscale.models import base, get_architecture, kernels
from upscale.models.agdn.network import tlc_origins
from upscale.models.base import Placement
from upscale.weights import load_model, resolve_weights

pytestmark = pytest.mark.usefixtures("cpu_kernels")  # runs AGDN on the CPU

ARCH = get_architecture("agdn")
SPEC_PARAMS = {("agdn", 2): 280_530, ("agdn", 3): 286_215, ("agdn", 4): 294_174, ("agdn-s", 4): 69_272}


def _variant(case) -> str:
    return "agdn-s" if case.meta["variant"] == "AGDN_S" or "_s_" in case.name else "agdn"


def _model(case, tlc: bool, impl: str = "kernels"):
    """impl: "kernels" (the default: fast path on the fused CPU kernels where they build), "fast" (the fast
    path in eager PyTorch) or "straight" (the reference implementation)."""
    entry = registry.resolve(_variant(case), case.meta["scale"])
    hparams = dict(entry.hparams, tlc_window=entry.hparams["tlc_window"] if tlc else None, fast=impl != "straight")
    model = ARCH.build(entry.name, entry.scale, hparams)
    model.load_state_dict(case.weights, strict=True)
    model.use_kernels = impl == "kernels"
    return model


@pytest.mark.parametrize("impl", ["kernels", "fast", "straight"])
@pytest.mark.parametrize("name", golden_case_names("agdn") or ["<missing>"])
def test_matches_official_outputs(name, impl):
    case = load_golden("agdn", name)
    io = case.io
    if impl == "kernels" and kernels.load() is None:
        pytest.skip(f"fused CPU kernels unavailable: {kernels.status()}")
    with torch.inference_mode():
        if "sr_raw" in io:  # TLC off: attention global over the whole input
            model = _model(case, tlc=False, impl=impl)
            assert model.uses_fast_path(io["lr"]) == (impl != "straight")
            assert_matches_golden(model(io["lr"]), io["sr_raw"], case.tolerance, f"{name} sr_raw {impl}")
        model = _model(case, tlc=True, impl=impl)
        if "sr_raw_tlc" in io:
            assert_matches_golden(model(io["lr"]), io["sr_raw_tlc"], case.tolerance, f"{name} sr_raw_tlc {impl}")
        assert_matches_golden(ARCH.reference_forward(model, io["lr_protocol"]), io["sr_protocol"],
                              case.tolerance, f"{name} sr_protocol {impl}")


@pytest.mark.parametrize("variant,scale", sorted(SPEC_PARAMS))
def test_parameter_count_equals_spec(variant, scale):
    entry = registry.resolve(variant, scale)
    model = ARCH.build(variant, scale, entry.hparams)
    n = sum(p.numel() for p in model.state_dict().values())
    assert n == SPEC_PARAMS[variant, scale] == entry.params
    assert len(model.state_dict()) == (492 if variant == "agdn" else 285)


@pytest.mark.parametrize("size,expected", [(44, [0]), (57, [0, 9]), (60, [0, 12]), (85, [0, 37]),
                                           (101, [0, 27, 53]), (117, [0, 35, 69]), (130, [0, 41, 82]),
                                           (128, [0, 40, 80]), (256, [0, 42, 84, 126, 168, 208])])
def test_tlc_window_origins_follow_the_official_grid(size, expected):
    assert tlc_origins(size, 48) == expected


def test_detect_recognises_agdn_weights():
    for name in golden_case_names("agdn"):
        case = load_golden("agdn", name)
        assert detected(case.weights) == (_variant(case), case.meta["scale"])
    assert detected({"foo": torch.zeros(1)}) is None


def test_batch_of_different_images_equals_single_runs():
    entry = registry.resolve("agdn", 2)
    model = ARCH.build("agdn", 2, entry.hparams)
    torch.manual_seed(0)
    x = torch.rand(3, 3, 40, 52)
    with torch.inference_mode():
        batched = model(x)
        for i in range(3):
            assert torch.allclose(batched[i : i + 1], model(x[i : i + 1]), atol=1e-5)


# -- the fast inference path against the straight reference implementation ------------------------------------

@pytest.fixture(scope="module")
def agdn_models():
    """The official AGDN x2 and x4 weights (the packaged files), built once."""
    models = {}
    for scale in (2, 4):
        entry = registry.resolve("agdn", scale)
        models[scale] = load_model(entry, resolve_weights(entry, None, offline=True))
    return models


def _photo(h: int, w: int, top: int = 0, left: int = 0) -> torch.Tensor:
    im = Image.open(REPO / "examples" / "coffee.png").convert("RGB")
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return x[..., top : top + h, left : left + w].contiguous()


def _random_smooth(h: int, w: int, seed: int) -> torch.Tensor:
    """Random image content with photo-like spectrum: random coarse pixels, bilinearly enlarged, plus a little
    fine noise (pure per-pixel noise is far outside what the network sees; see the noise test below)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, h // 6), max(2, w // 6), generator=g)
    x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (x + 0.02 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


def _close(a: torch.Tensor, b: torch.Tensor, max_abs: float, mean_abs: float, what: str):
    d = (a.double() - b.double()).abs()
    assert d.max() <= max_abs and d.mean() <= mean_abs, f"{what}: max {d.max():.3g}, mean {d.mean():.3g}"


PLACEMENT_CASES = [None, "inner tile"]


def _placement(kind, x):
    """None (the official computation) or a tile placed inside a larger image (local-statistics mode)."""
    return None if kind is None else Placement((x.shape[-2] + 30, x.shape[-1] + 12), (12, 6))


@pytest.mark.parametrize("impl", ["kernels", "eager"])
@pytest.mark.parametrize("placement", PLACEMENT_CASES)
@pytest.mark.parametrize("scale,size,seed", [(4, (37, 53), 0), (2, (37, 53), 1), (4, (15, 15), 2), (4, (64, 96), 3),
                                             (2, (57, 130), 4)])
def test_fast_path_equals_straight_path_on_random_images(agdn_models, scale, size, seed, placement, impl):
    """Both versions of the fast path: on the fused CPU kernels and in eager PyTorch."""
    if impl == "kernels" and kernels.load() is None:
        pytest.skip(f"fused CPU kernels unavailable: {kernels.status()}")
    model = copy.copy(agdn_models[scale])  # shallow: shares the weights, own use_kernels flag
    model.use_kernels = impl == "kernels"
    x = _random_smooth(*size, seed)
    pl = _placement(placement, x)
    with torch.inference_mode():
        assert model.uses_fast_path(x)
        _close(model(x, pl), model(x, pl, fast=False), 1e-5, 2e-6, f"x{scale} {size} {placement} {impl}")


@pytest.mark.parametrize("placement", PLACEMENT_CASES)
def test_fast_path_equals_straight_path_on_a_photo(agdn_models, placement):
    x = _photo(53, 101, top=11, left=7)  # odd sizes, TLC windows overlap on both axes
    pl = _placement(placement, x)
    with torch.inference_mode():
        for scale, model in agdn_models.items():
            _close(model(x, pl), model(x, pl, fast=False), 1e-5, 2e-6, f"x{scale} {placement}")


@pytest.mark.parametrize("placement", PLACEMENT_CASES)
def test_fast_path_is_the_same_function_in_float64(agdn_models, placement):
    """Exact algebra: in float64 both paths agree to rounding (1e-10), so any float32 difference is rounding."""
    model64 = copy.deepcopy(agdn_models[2]).double()
    x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pl = _placement(placement, x)
    with torch.inference_mode():
        _close(model64(x, pl), model64(x, pl, fast=False), 1e-10, 1e-12, f"float64 {placement}")


@pytest.mark.parametrize("placement", PLACEMENT_CASES)
def test_fast_path_rounding_no_worse_than_straight_on_noise(agdn_models, placement):
    """Per-pixel uniform noise drives AGDN x2 into large activations; float32 rounding then grows block by
    block in *either* implementation to ~3e-4 max / ~3e-6 mean against float64 (so a 1e-5 bound between the
    two cannot hold there, and which one lands closer varies per image). Over a few images the fast path's
    error must be about the straight path's."""
    model = agdn_models[2]
    model64 = copy.deepcopy(model).double()
    fast_err = straight_err = 0.0
    with torch.inference_mode():
        for seed in range(3):
            x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(seed))
            pl = _placement(placement, x)
            truth = model64(x.double(), pl, fast=False)
            fast_err += float((model(x, pl).double() - truth).abs().mean())
            straight_err += float((model(x, pl, fast=False).double() - truth).abs().mean())
    # the ratio moves with the thread count (1.1x with one thread, 1.5x with two in CI), so bound both ways:
    # relative to the straight path, and absolutely at the float32 noise level seen here (~3e-6 per image)
    assert fast_err <= 3 * straight_err and fast_err / 3 <= 1e-5


def test_fast_path_batch_and_new_weights():
    """Batches run per image; loading other weights rebuilds the fast path's folded weights."""
    entry = registry.resolve("agdn", 2)
    model = ARCH.build("agdn", 2, entry.hparams)
    x = _random_smooth(40, 52, 7).repeat(2, 1, 1, 1)
    x[1] = x[1].flip(-1)
    with torch.inference_mode():
        first = model(x)
        _close(first, model(x, fast=False), 1e-5, 2e-6, "random init")
        torch.manual_seed(1)
        other = ARCH.build("agdn", 2, entry.hparams)
        model.load_state_dict(other.state_dict())
        second = model(x)
        assert not torch.allclose(first, second)
        _close(second, other(x, fast=False), 1e-5, 2e-6, "after load_state_dict")


def test_fast_path_sees_weights_edited_in_place_or_replaced():
    """The folded weights are cached between calls; an in-place edit of a parameter or a new Parameter object
    on a submodule must rebuild them (the fast path then still equals the straight one)."""
    entry = registry.resolve("agdn", 2)
    torch.manual_seed(3)
    model = ARCH.build("agdn", 2, entry.hparams)
    x = _random_smooth(24, 20, 5)
    with torch.no_grad():
        first = model(x)
        model.B3.c5.weight.mul_(1.5)  # in place: the version counter moves
        edited = model(x)
        assert not torch.allclose(first, edited)
        _close(edited, model(x, fast=False), 1e-5, 2e-6, "after an in-place edit")
        model.B5.ea.restormer_attn.project_out.weight = torch.nn.Parameter(
            -model.B5.ea.restormer_attn.project_out.weight.detach().clone())
        replaced = model(x)
        assert not torch.allclose(edited, replaced)
        _close(replaced, model(x, fast=False), 1e-5, 2e-6, "after replacing a Parameter")


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("band_pixels", [1, 37, 200, 5000])
@pytest.mark.parametrize("size,batch", [((17, 23), 1), ((40, 33), 2), ((15, 64), 1)])
def test_head_and_upsampler_by_bands_equal_one_band(agdn_models, monkeypatch, band_pixels, size, batch):
    """fea_conv and the upsampler run a band of rows at a time (`fused._band_rows`): any band height, from one
    row up, gives the output of a single band (a wrong row at a band's edge would be off by far more; the
    upsampler's oneDNN conv rounds differently for different band heights, fea_conv on the kernels' GEMM not)."""
    from upscale.models.agdn import fused

    model = agdn_models[4]
    x = torch.cat([_random_smooth(*size, seed) for seed in range(batch)])
    with torch.inference_mode():
        whole = model(x)
        monkeypatch.setattr(fused, "_BAND_PIXELS", band_pixels)
        assert fused._band_rows(size[1]) < size[0] or band_pixels == 5000
        _close(model(x), whole, 2e-5, 1e-6, f"bands of {fused._band_rows(size[1])} rows")


@pytest.mark.usefixtures("cpu_kernels")
def test_fused_scratch_grows_to_the_largest_tile_and_goes_when_the_run_ends(agdn_models, monkeypatch):
    """Tiles of a photo come in a few sizes: the fused path's maps are kept and grown, not made afresh for each
    size (fresh pages fault on first touch); when a run ends the engine keeps them if small (the next image
    reuses them) and drops them if large."""
    model = agdn_models[2]
    model._workspace = None  # whatever an earlier test left
    with torch.inference_mode():
        model(_random_smooth(48, 40, 1))
        buffers = {k: (v.data_ptr(), v.numel()) for k, v in model._workspace.buffers.items()}
        model(_random_smooth(30, 36, 2))  # smaller: the same buffers
        assert {k: (v.data_ptr(), v.numel()) for k, v in model._workspace.buffers.items()} == buffers
        model(_random_smooth(64, 40, 3))  # larger: grown
        assert all(model._workspace.buffers[k].numel() > n for k, (_, n) in buffers.items())
        up = Upscaler(registry.resolve("agdn", 2), model, torch.device("cpu"), "tiled", tile=32)
        up.run(_random_smooth(50, 70, 4))
        kept = model._workspace
        assert kept is not None and kept.nbytes() < base.KEEP_SCRATCH_BYTES
        up.run(_random_smooth(50, 70, 4))
        assert model._workspace is kept  # reused by the next image
        monkeypatch.setattr(base, "KEEP_SCRATCH_BYTES", kept.nbytes() - 1)
        up.run(_random_smooth(50, 70, 4))
    assert model._workspace is None


def test_straight_path_where_the_fast_path_does_not_apply(agdn_models):
    model = agdn_models[2]
    x = _photo(20, 24)
    assert not model.uses_fast_path(x, fast=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not model.uses_fast_path(x)  # autocast: the straight modules (and their hooks) run
    trainable = copy.deepcopy(model).requires_grad_(True)
    assert not trainable.uses_fast_path(x)  # autograd needs the straight path
    with torch.no_grad():
        assert trainable.uses_fast_path(x)
    assert not ARCH.build("agdn", 2, dict(registry.resolve("agdn", 2).hparams, fast=False)).uses_fast_path(x)
