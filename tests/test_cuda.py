"""The GPU paths on a real CUDA device (skipped cleanly without one; `scripts/device-check` runs them). On the
CPU, test_device_paths.py forces the same code paths."""

import pytest
import torch
from conftest import golden_case_names, load_golden

from upscale import memory, registry
from upscale.engine import Upscaler
from upscale.weights import build_model, detect

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda", 0)  # an index: the memory cap (set_per_process_memory_fraction) needs one


def golden_upscaler(family: str, case: str, **kw) -> tuple[Upscaler, dict]:
    golden = load_golden(family, case)
    entry = detect(golden.weights)
    model = build_model(entry)
    model.load_state_dict({k: v.float() for k, v in golden.weights.items()})
    return Upscaler(entry, model.to(CUDA).eval(), CUDA, **kw), golden


@pytest.mark.parametrize("family,case", [(f, c) for f in ("agdn", "esc", "asid") for c in golden_case_names(f)])
def test_golden_protocol_in_fp32_on_cuda_is_within_tolerance(family, case):
    up, golden = golden_upscaler(family, case, protocol="reference", precision="fp32")
    io = golden.io
    y, _ = up.run(io["lr_protocol"])
    if family == "asid":  # the official ASID script clips to [0, 1] (tests/models/test_asid.py)
        y = y.clamp(0, 1)
    diff = (y - io["sr_protocol"]).abs()
    max_abs, mean_abs = golden.tolerance
    assert diff.max() <= max_abs and diff.mean() <= mean_abs, (diff.max().item(), diff.mean().item())


def test_asid_reference_batches_tiles_on_cuda():
    up, golden = golden_upscaler("asid", "asid_x2", protocol="reference", precision="fp32")
    y, stats = up.run(torch.rand(1, 3, 256, 256))
    assert stats.tiles_per_forward > 1


@pytest.mark.parametrize("family,case", [("agdn", "agdn_x2"), ("asid", "asid_x2"), ("esc", "esc_x2")])
def test_blending_on_the_gpu_or_through_pinned_host_memory_gives_the_same_image(family, case):
    up, _ = golden_upscaler(family, case, protocol="tiled", precision="fp32", tile=64)
    x = torch.rand(1, 3, 200, 260)
    up.blend_on_device = True
    on_device, _ = up.run(x)
    up.blend_on_device = False
    on_host, _ = up.run(x)
    assert torch.equal(on_device, on_host)


def test_a_real_out_of_memory_finishes_in_tiles():
    up, _ = golden_upscaler("agdn", "agdn_x2", protocol="whole", precision="fp32")
    h, w = 1080, 1920
    torch.cuda.empty_cache()
    cap = torch.cuda.memory_allocated(CUDA) + up.memory_estimate().bytes_for(h * w) // 4
    torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(CUDA).total_memory, CUDA)
    try:
        y, stats = up.run(torch.rand(1, 3, h, w))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    assert stats.protocol == "tiled" and len(stats.notes) == 1 and stats.notes[0].startswith("out of memory")
    assert y.shape == (1, 3, 2 * h, 2 * w) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["agdn", "esc", "asid"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_peak_memory_on_cuda_stays_under_the_family_estimate(name, precision):
    entry = registry.resolve(name, 2)
    model = build_model(entry).eval().requires_grad_(False).to(CUDA)
    up = Upscaler(entry, model, CUDA, "whole", precision)
    up.run(torch.rand(1, 3, 64, 64))
    for h, w in ((256, 256), (512, 384)):
        with memory.PeakMemory(CUDA) as peak:
            up.run(torch.rand(1, 3, h, w))
        assert peak.extra <= up.memory_estimate().bytes_for(h * w), (h, w, peak.extra)
